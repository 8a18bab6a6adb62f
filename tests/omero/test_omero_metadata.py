"""What the OMERO backend stores besides pixels from the optional open fields and the measured
plane metadata: channel colours, time increment, well and time point key-values, and each
PlaneInfo's measured position, exposure and DeltaT (read back through plain omero-py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("omero")

import omero

from tests.omero.helpers import DEVICE, key_values, settings_for, unique_manifest
from tests.storage.test_plane_metadata import COLORS, measured
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import Layout, OpenManifest, Well
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.metadata import METADATA_NS
from tilebridge_storage.plane_metadata import MEASURED_NS
from tilebridge_storage.testing.manifests import make_tiles


def described(layout: Layout) -> OpenManifest:
    return unique_manifest(
        layout=layout,
        channel_colors=COLORS,
        time_interval_s=30.0,
        first_time_point=2,
        well=Well(plate="corning-96", row="B", column=7),
    )


def query(conn: Any, hql: str, object_id: int) -> list[Any]:
    found: list[Any] = conn.c.sf.getQueryService().findAllByQuery(
        hql, omero.sys.ParametersI().addId(object_id)
    )
    return found


def write(omero_target: Any, m: OpenManifest) -> Any:
    backend = OmeroBackend(settings_for(omero_target))
    try:
        writer = backend.open_image(DEVICE, m)
        for key, pixels in make_tiles(m).items():
            writer.write_tile(key, pixels)
        writer.add_planes(measured(m))
        return writer.finish()
    finally:
        backend.close()


def planes_of(conn: Any, image_id: int) -> dict[tuple[int, int, int], Any]:
    found = query(conn, "select p from PlaneInfo p where p.pixels.image.id = :id", image_id)
    return {
        (p.getTheT().getValue(), p.getTheC().getValue(), p.getTheZ().getValue()): p for p in found
    }


def check_pixels_description(conn: Any, image_id: int, m: OpenManifest) -> None:
    [pixels] = query(
        conn,
        "select p from Pixels p join fetch p.channels c join fetch c.logicalChannel "
        "where p.image.id = :id",
        image_id,
    )
    assert pixels.getTimeIncrement().getValue() == 30.0
    assert pixels.getTimeIncrement().getUnit() == omero.model.enums.UnitsTime.SECOND
    channels = sorted(pixels.copyChannels(), key=lambda c: c.getId().getValue())
    colors = [
        "".join(f"{getattr(c, f'get{part}')().getValue():02X}" for part in ("Red", "Green", "Blue"))
        for c in channels
    ]
    assert colors == list(COLORS)
    kv = key_values(conn, image_id, METADATA_NS)
    assert (kv["plate"], kv["well"], kv["first_time_point"]) == ("corning-96", "B7", "2")


def test_per_tile_images_carry_each_tiles_measured_plane(omero_target: Any) -> None:
    m = described(Layout.PER_TILE)
    stored = write(omero_target, m)
    conn = omero_target.connect()
    planes = measured(m)
    for position in m.positions:
        image_id = stored.ids[f"image_{position.index}"]
        check_pixels_description(conn, image_id, m)
        seen = planes_of(conn, image_id)
        assert len(seen) == m.size_t * m.size_c * m.size_z
        for (t, c, z), plane in seen.items():
            meta = planes[TileKey(position.index, z, c, t)]
            assert plane.getPositionX().getValue() == pytest.approx(meta.x_um)
            assert plane.getPositionZ().getValue() == pytest.approx(meta.z_um)
            assert plane.getExposureTime().getValue() == pytest.approx(meta.exposure_ms)
            assert plane.getExposureTime().getUnit() == omero.model.enums.UnitsTime.MILLISECOND
            assert plane.getDeltaT().getValue() == pytest.approx(meta.delta_t_s)
        per_tile = key_values(conn, image_id, MEASURED_NS)
        assert len(per_tile) == m.size_t * m.size_c * m.size_z  # only this position's tiles


def test_a_mosaic_has_one_plane_per_tcz_and_every_tile_measured(omero_target: Any) -> None:
    m = described(Layout.MOSAIC)
    stored = write(omero_target, m)
    conn = omero_target.connect()
    image_id = stored.ids["image"]
    check_pixels_description(conn, image_id, m)
    planes = measured(m)
    for (t, c, z), plane in planes_of(conn, image_id).items():
        tiles = [planes[TileKey(p.index, z, c, t)] for p in m.positions]
        assert plane.getPositionZ().getValue() == pytest.approx(np.mean([x.z_um for x in tiles]))
        assert plane.getDeltaT().getValue() == pytest.approx(min(x.delta_t_s for x in tiles))
        assert plane.getPositionX().getValue() == min(p.x_um for p in m.positions)
    assert len(key_values(conn, image_id, MEASURED_NS)) == m.tile_count


def test_an_existing_dataset_or_project_named_by_id_is_used(omero_target: Any) -> None:
    first = unique_manifest(project="lab-a", dataset="screen-1")
    made = write(omero_target, first)
    project_id, dataset_id = made.ids["project"], made.ids["dataset"]
    # By dataset id: the names beside it do not matter.
    by_dataset = unique_manifest(project="other", dataset="other", omero_dataset_id=dataset_id)
    stored = write(omero_target, by_dataset)
    assert (stored.ids["project"], stored.ids["dataset"]) == (project_id, dataset_id)
    # By project id: the dataset by name inside that project.
    by_project = unique_manifest(project="other", dataset="screen-2", omero_project_id=project_id)
    stored = write(omero_target, by_project)
    assert stored.ids["project"] == project_id and stored.ids["dataset"] != dataset_id
    conn = omero_target.connect()
    dataset = conn.c.sf.getQueryService().get("Dataset", stored.ids["dataset"])
    assert dataset.getName().getValue() == "screen-2"


def test_a_container_id_that_is_not_there_or_not_allowed_is_refused(omero_target: Any) -> None:
    from tilebridge_protocol.errors import PermanentError
    from tilebridge_storage.omero_backend.settings import DevicePolicy

    with pytest.raises(PermanentError, match=r"Dataset:987654 does not exist"):
        write(omero_target, unique_manifest(omero_dataset_id=987654))
    made = write(omero_target, unique_manifest(project="lab-a", dataset="screen-1"))
    strict = DevicePolicy(projects=("lab-b",), may_create=True)
    backend = OmeroBackend(settings_for(omero_target, default_policy=strict))
    try:
        named = unique_manifest(project="lab-b", omero_dataset_id=made.ids["dataset"])
        with pytest.raises(PermanentError, match="may not write to project 'lab-a'"):
            backend.open_image(DEVICE, named)
    finally:
        backend.close()

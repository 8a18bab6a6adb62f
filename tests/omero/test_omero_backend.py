"""The OMERO backend end to end: pixels, links, metadata, layouts, policy, arrival order."""

from __future__ import annotations

import random
from datetime import UTC
from typing import Any
from uuid import uuid4

import numpy as np
import pytest

pytest.importorskip("omero")

import omero

from tests.omero.helpers import (
    DEVICE,
    digest,
    expected_pixels,
    images_of,
    key_values,
    read_pixels,
    settings_for,
    standin,
    unique_manifest,
)
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import PROTOCOL_VERSION, OpenManifest
from tilebridge_storage.base import Holdings, StoredImage
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.metadata import METADATA_NS
from tilebridge_storage.omero_backend.provenance import PROVENANCE_NS
from tilebridge_storage.omero_backend.settings import DevicePolicy
from tilebridge_storage.testing.manifests import make_tiles


@pytest.fixture
def backend(omero_target: Any) -> Any:
    backend = OmeroBackend(settings_for(omero_target))
    yield backend
    backend.close()


def store(backend: OmeroBackend, manifest: OpenManifest, tiles: Any, seed: int = 0) -> StoredImage:
    writer = backend.open_image(DEVICE, manifest)
    keys = list(tiles)
    random.Random(seed).shuffle(keys)
    for key in keys:
        writer.write_tile(key, tiles[key])
    return writer.finish()


def query(conn: Any, hql: str, image_id: int) -> list[Any]:
    result: list[Any] = conn.c.sf.getQueryService().findAllByQuery(
        hql, omero.sys.ParametersI().addId(image_id)
    )
    return result


def assert_described(conn: Any, image_id: int, manifest: OpenManifest, tiles: Any) -> None:
    """Links, pixel sizes, channel names and ranges, date, annotations, tags."""
    m = manifest
    [link] = query(conn, "select l from DatasetImageLink l where l.child.id = :id", image_id)
    dataset_id = link.getParent().getId().getValue()
    [project_link] = query(
        conn, "select l from ProjectDatasetLink l where l.child.id = :id", dataset_id
    )
    project = conn.c.sf.getQueryService().get(
        "Project", project_link.getParent().getId().getValue()
    )
    assert project.getName().getValue() == m.project
    dataset = conn.c.sf.getQueryService().get("Dataset", dataset_id)
    assert dataset.getName().getValue() == m.dataset

    image = conn.c.sf.getQueryService().get("Image", image_id)
    assert image.getAcquisitionDate().getValue() == int(m.acquired_at.timestamp() * 1000)
    [pixels] = query(
        conn,
        "select p from Pixels p join fetch p.channels c join fetch c.logicalChannel "
        "left outer join fetch c.statsInfo where p.image.id = :id",
        image_id,
    )
    size_x = pixels.getPhysicalSizeX()
    assert size_x.getValue() == m.pixel_size.x_um
    assert size_x.getUnit() == omero.model.enums.UnitsLength.MICROMETER
    assert pixels.getPhysicalSizeY().getValue() == m.pixel_size.y_um
    channels = sorted(pixels.copyChannels(), key=lambda c: c.getId().getValue())
    assert [c.getLogicalChannel().getName().getValue() for c in channels] == list(m.channels)
    expected = expected_pixels(m, tiles)
    for c, channel in enumerate(channels):
        stats = channel.getStatsInfo()
        assert stats.getGlobalMin().getValue() == float(expected[:, c].min())
        assert stats.getGlobalMax().getValue() == float(expected[:, c].max())

    meta = key_values(conn, image_id, METADATA_NS)
    assert meta["experiment"] == m.experiment
    assert meta["device"] == DEVICE
    for key, value in m.key_values.items():
        assert meta[key] == value
    if m.layout.value == "mosaic":
        for p in m.positions:
            assert meta[f"position {p.index}"] == f"{p.x_um},{p.y_um},{p.z_um} um"
        origin = (min(p.x_um for p in m.positions), min(p.y_um for p in m.positions))
        assert meta["canvas_origin_um"] == f"{origin[0]},{origin[1]}"
        planes = query(conn, "select p from PlaneInfo p where p.pixels.image.id = :id", image_id)
        assert len(planes) == m.size_z * m.size_c * m.size_t
        assert {(p.getPositionX().getValue(), p.getPositionY().getValue()) for p in planes} == {
            origin
        }
    prov = key_values(conn, image_id, PROVENANCE_NS)
    assert prov["image_id"] == str(m.image_id)
    assert prov["protocol_version"] == str(PROTOCOL_VERSION)
    links = query(
        conn,
        "select l from ImageAnnotationLink l join fetch l.child where l.parent.id = :id",
        image_id,
    )
    tag_names = sorted(
        link.getChild().getTextValue().getValue()
        for link in links
        if isinstance(link.getChild(), omero.model.TagAnnotation)
    )
    assert tag_names == sorted(m.tags)


def test_big_mosaic_is_written_as_a_pyramid_equal_to_the_source(
    backend: OmeroBackend, omero_target: Any
) -> None:
    # 3 x 3 tiles of 1200 x 1200 with 10 % overlap: a 3360 x 3360 canvas, above 3192 x 3192
    manifest = unique_manifest(
        columns=3, rows=3, tile=(1200, 1200), size_z=1, size_c=2, tags=("slide-7", "run-A")
    )
    tiles = make_tiles(manifest, seed=11)
    stored = store(backend, manifest, tiles)

    image_id = stored.ids["image"]
    assert stored.backend == "omero"
    assert stored.location == f"omero:Image:{image_id} dataset:{stored.ids['dataset']}"
    conn = omero_target.connect()
    got = read_pixels(conn, image_id)
    assert got.shape == (1, 2, 1, 3360, 3360)
    assert digest(got) == digest(expected_pixels(manifest, tiles))
    assert_described(conn, image_id, manifest, tiles)
    assert images_of(conn, manifest) == [image_id]
    if omero_target.server is not None:
        assert omero_target.server.pixel_state(image_id) == "complete"


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint32", "float32", "float64"])
def test_small_images_of_every_pixel_type_round_trip(
    backend: OmeroBackend, omero_target: Any, dtype: str
) -> None:
    manifest = unique_manifest(dtype=dtype, tags=("small",))
    tiles = make_tiles(manifest, seed=3)
    stored = store(backend, manifest, tiles)
    conn = omero_target.connect()
    got = read_pixels(conn, stored.ids["image"])
    assert got.dtype == np.dtype(dtype)
    assert digest(got) == digest(expected_pixels(manifest, tiles))
    assert_described(conn, stored.ids["image"], manifest, tiles)
    if omero_target.server is not None:
        assert omero_target.server.pixel_state(stored.ids["image"]) == "romio"


def test_per_tile_layout_makes_one_image_per_position_with_its_stage_position(
    backend: OmeroBackend, omero_target: Any
) -> None:
    manifest = unique_manifest(layout="per_tile", columns=2, rows=2, tags=("per-tile",))
    tiles = make_tiles(manifest, seed=5)
    stored = store(backend, manifest, tiles)

    ids = [stored.ids[f"image_{p.index}"] for p in manifest.positions]
    assert stored.ids["image"] == ids[0]
    joined = ",".join(map(str, ids))
    assert stored.location == f"omero:Image:{joined} dataset:{stored.ids['dataset']}"
    conn = omero_target.connect()
    assert images_of(conn, manifest) == sorted(ids)
    for position, image_id in zip(manifest.positions, ids, strict=True):
        image = conn.c.sf.getQueryService().get("Image", image_id)
        assert image.getName().getValue() == f"{manifest.image_name} position {position.index}"
        got = read_pixels(conn, image_id)
        assert digest(got) == digest(expected_pixels(manifest, tiles, position.index))
        planes = query(conn, "select p from PlaneInfo p where p.pixels.image.id = :id", image_id)
        assert len(planes) == manifest.size_z * manifest.size_c * manifest.size_t
        assert {p.getPositionX().getValue() for p in planes} == {position.x_um}
        assert {p.getPositionY().getValue() for p in planes} == {position.y_um}
        assert key_values(conn, image_id, PROVENANCE_NS)["position"] == str(position.index)
        meta = key_values(conn, image_id, METADATA_NS)
        assert meta[f"position {position.index}"].startswith(f"{position.x_um},{position.y_um},")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tiles_in_random_order_still_make_a_correct_pyramid(
    omero_standin_factory: Any, seed: int
) -> None:
    # Small pyramid tiles and threshold make many bands and planes (XYZCT with z, c, t > 1).
    target = omero_standin_factory(pyramid_threshold_px=50 * 50, pyramid_tile=(32, 16))
    backend = OmeroBackend(settings_for(target))
    try:
        for layout in ("mosaic", "per_tile"):
            manifest = unique_manifest(layout=layout, size_t=2)
            tiles = make_tiles(manifest, seed=seed)
            stored = store(backend, manifest, tiles, seed=seed)
            for image_id in {v for k, v in stored.ids.items() if k.startswith("image")}:
                assert target.server.pixel_state(image_id) == "complete"
            if layout == "mosaic":
                got = target.server.pixels(stored.ids["image"])
                assert digest(got) == digest(expected_pixels(manifest, tiles))
            else:
                for p in manifest.positions:
                    got = target.server.pixels(stored.ids[f"image_{p.index}"])
                    assert digest(got) == digest(expected_pixels(manifest, tiles, p.index))
    finally:
        backend.close()


@pytest.mark.parametrize("told", ["before the tiles", "after the tiles"])
def test_a_sparse_pyramid_is_still_written_in_one_pass(
    omero_standin_factory: Any, told: str
) -> None:
    """Position 0 was never planned: the bands that wait for it are written, zeros there, as
    soon as the writer is told (the stand-in refuses any other order of a pyramid's tiles)."""
    target = omero_standin_factory(pyramid_threshold_px=50 * 50, pyramid_tile=(32, 16))
    backend = OmeroBackend(settings_for(target))
    conn = target.connect()
    try:
        for layout in ("mosaic", "per_tile"):
            manifest = unique_manifest(layout=layout, size_t=2)
            tiles = {k: v for k, v in make_tiles(manifest, seed=4).items() if k.index != 0}
            holdings = Holdings(frozenset(tiles), not_planned=frozenset({0}))
            writer = backend.open_image(DEVICE, manifest)
            if told == "before the tiles":
                writer.expect(holdings)
            keys = list(tiles)
            random.Random(4).shuffle(keys)
            for key in keys:
                writer.write_tile(key, tiles[key])
            if told == "after the tiles":
                writer.expect(holdings)
            stored = writer.finish()
            images = {k: v for k, v in stored.ids.items() if k.startswith("image")}
            for name, image_id in images.items():
                assert target.server.pixel_state(image_id) == "complete"
                if name == "image" and layout == "per_tile":
                    continue  # the first position's image, named again as image_0
                index = None if layout == "mosaic" else int(name.split("_")[1])
                got = target.server.pixels(image_id)
                assert digest(got) == digest(expected_pixels(manifest, tiles, index))
                kv = key_values(conn, image_id, METADATA_NS)
                assert kv["tilebridge.not_planned"] == "0"
                assert "tilebridge.incomplete" not in kv
            if layout == "per_tile":
                assert not target.server.pixels(stored.ids["image_0"]).any()
    finally:
        backend.close()


def test_pyramid_bands_are_written_while_tiles_still_arrive(omero_standin: Any) -> None:
    server = standin(omero_standin)
    backend = OmeroBackend(settings_for(omero_standin))
    try:
        manifest = unique_manifest(
            columns=3, rows=3, tile=(1200, 1200), size_z=1, size_c=1, channels=["DAPI"]
        )
        tiles = make_tiles(manifest, seed=2)
        writer = backend.open_image(DEVICE, manifest)
        first_row = [TileKey(i) for i in range(3)]
        for key in first_row:
            writer.write_tile(key, tiles[key])
        # The bands only the first row of tiles covers are in OMERO already: rows up to
        # 1024 (the second row of tiles owns the canvas from 1140 on), 14 tiles of 256 across.
        assert server.set_tile_calls == 4 * 14
        image_id = writer.image_ids[0]
        assert server.pixel_state(image_id) == "writing"
        for key in manifest.tile_keys():
            if key not in first_row:
                writer.write_tile(key, tiles[key])
        # ... and the last tile completed the pass: finish only confirms it.
        assert server.pixel_state(image_id) == "complete"
        stored = writer.finish()
        assert digest(server.pixels(stored.ids["image"])) == digest(
            expected_pixels(manifest, tiles)
        )
    finally:
        backend.close()


def test_images_share_one_project_and_dataset_and_one_login(
    backend: OmeroBackend, omero_target: Any
) -> None:
    one, two = unique_manifest(image_name="one"), unique_manifest(image_name="two")
    s1 = store(backend, one, make_tiles(one))
    s2 = store(backend, two, make_tiles(two))
    assert (s1.ids["project"], s1.ids["dataset"]) == (s2.ids["project"], s2.ids["dataset"])
    assert s1.ids["image"] != s2.ids["image"]
    server = standin(omero_target)
    assert [p.getName().getValue() for p in server.projects()] == [one.project]
    assert [d.getName().getValue() for d in server.datasets()] == [one.dataset]
    assert len({s.uuid for s in server.sessions.all() if not s.closed}) == 1


def test_existing_tags_are_reused(backend: OmeroBackend, omero_target: Any) -> None:
    one = unique_manifest(image_name="one", tags=("shared",))
    two = unique_manifest(image_name="two", tags=("shared", "own"))
    store(backend, one, make_tiles(one))
    store(backend, two, make_tiles(two))
    server = standin(omero_target)
    texts = sorted(a.getTextValue().getValue() for a in server.objects("TagAnnotation"))
    assert texts == ["own", "shared"]


# -- policy --------------------------------------------------------------------------------


def test_policy_refuses_a_project_outside_its_patterns(omero_target: Any) -> None:
    policy = DevicePolicy(projects=("lab-*",), may_create=True, may_create_project=True)
    backend = OmeroBackend(settings_for(omero_target, devices={DEVICE: policy}))
    try:
        with pytest.raises(PermanentError, match=r"scope-1 may not write to project 'tilebridge"):
            backend.open_image(DEVICE, unique_manifest())
        manifest = unique_manifest(project="lab-7")
        with pytest.raises(PermanentError, match=r"may not write to dataset"):
            OmeroBackend(
                settings_for(
                    omero_target,
                    devices={DEVICE: policy.model_copy(update={"datasets": ("run-*",)})},
                )
            ).open_image(DEVICE, manifest)
        if omero_target.server is not None:
            assert omero_target.server.projects() == []
    finally:
        backend.close()


def test_unknown_device_without_default_policy_is_refused(omero_target: Any) -> None:
    backend = OmeroBackend(settings_for(omero_target, default_policy=None))
    with pytest.raises(PermanentError, match="scope-1 is not allowed to write to OMERO"):
        backend.open_image(DEVICE, unique_manifest())


def test_missing_containers_are_created_only_when_the_policy_allows(omero_target: Any) -> None:
    # a project of its own, so the test also means something on a real server's data
    project = f"tilebridge-policy-{uuid4().hex[:8]}"
    manifest = unique_manifest(project=project, dataset="exp-2026-11-24")
    strict = OmeroBackend(settings_for(omero_target, default_policy=DevicePolicy()))
    per_experiment = OmeroBackend(
        settings_for(omero_target, default_policy=DevicePolicy(may_create=True))
    )
    everything = OmeroBackend(settings_for(omero_target))
    try:
        with pytest.raises(PermanentError, match="does not allow creating projects"):
            strict.open_image(DEVICE, manifest)
        first = unique_manifest(project=project, dataset="first")
        store(everything, first, make_tiles(first))
        # the project exists now; the per-experiment dataset does not
        with pytest.raises(PermanentError, match="does not allow creating datasets"):
            strict.open_image(DEVICE, manifest)
        stored = store(per_experiment, manifest, make_tiles(manifest))
        assert stored.ids["dataset"] > 0
        # and a strict policy may write into the dataset now that it exists
        again = unique_manifest(project=project, dataset="exp-2026-11-24", image_name="again")
        assert store(strict, again, make_tiles(again)).ids["dataset"] == stored.ids["dataset"]
    finally:
        for b in (strict, per_experiment, everything):
            b.close()


def test_a_group_the_user_is_not_in_is_refused(omero_target: Any) -> None:
    backend = OmeroBackend(settings_for(omero_target, group="not-my-group"))
    with pytest.raises(PermanentError, match="not a member of group 'not-my-group'"):
        backend.open_image(DEVICE, unique_manifest())


def test_ingest_settings_build_the_omero_backend(omero_target: Any, tmp_path: Any) -> None:
    from server_ingest.backends import build_backends
    from server_ingest.settings import IngestSettings

    omero_settings = settings_for(omero_target)
    settings = IngestSettings(data_dir=tmp_path, backends=("omero",), omero=omero_settings)
    [backend] = build_backends(settings)
    assert isinstance(backend, OmeroBackend)
    assert backend.settings == omero_settings
    with pytest.raises(PermanentError, match="without an 'omero' settings section"):
        build_backends(IngestSettings(data_dir=tmp_path, backends=("omero",)))


def test_without_omero_py_the_backend_asks_for_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import importlib.util

    from server_ingest.backends import build_backends
    from server_ingest.settings import IngestSettings

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "omero" else real(name, *a)
    )
    with pytest.raises(PermanentError, match=r"install the \[omero\] extra"):
        build_backends(IngestSettings(data_dir=tmp_path, backends=("omero",)))


def test_acquisition_date_keeps_its_instant(backend: OmeroBackend, omero_target: Any) -> None:
    from datetime import datetime, timedelta, timezone

    when = datetime(2026, 11, 24, 10, 30, 15, tzinfo=timezone(timedelta(hours=1)))
    manifest = unique_manifest(acquired_at=when)
    stored = store(backend, manifest, make_tiles(manifest))
    image = omero_target.connect().c.sf.getQueryService().get("Image", stored.ids["image"])
    got = datetime.fromtimestamp(image.getAcquisitionDate().getValue() / 1000, UTC)
    assert got == when

"""Every file backend stores what the acquisition measured per tile (PlaneMeta) and the optional
open fields (channel colours, time interval and time point, well), read back with ome-types
and zarr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from ome_types import OME, from_xml

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta, Well
from tilebridge_storage import registry
from tilebridge_storage.base import StoredImage
from tilebridge_storage.plane_metadata import MEASURED_NS, mosaic_planes
from tilebridge_storage.testing.manifests import make_manifest, make_tiles
from tilebridge_storage.tiff_metadata import METADATA_NS

COLORS = ("0000FF", "FF00FF")


def manifest() -> OpenManifest:
    return make_manifest(
        channel_colors=COLORS,
        time_interval_s=30.0,
        first_time_point=2,
        well=Well(plate="corning-96", row="B", column=7, condition="drug A"),
    )


def measured(m: OpenManifest) -> dict[TileKey, PlaneMeta]:
    """Every tile measured a little off its planned position, at its own z and time."""
    out = {}
    for key in m.tile_keys():
        p = m.positions[key.index]
        out[key] = PlaneMeta(
            x_um=p.x_um + 0.5,
            y_um=p.y_um - 0.25,
            z_um=100.0 + 2.0 * key.z + 0.01 * key.index,
            exposure_ms=20.0 + key.c,
            delta_t_s=3.0 * key.index + 0.5 * key.z + 0.25 * key.c,
        )
    return out


def store(kind: str, tmp_path: Path) -> tuple[OpenManifest, dict[TileKey, PlaneMeta], StoredImage]:
    m = manifest()
    planes = measured(m)
    writer = registry.create(kind, folder=tmp_path / kind).open_image("scope-1", m)
    for key, pixels in make_tiles(m).items():
        writer.write_tile(key, pixels)
    writer.add_planes(dict(list(planes.items())[:5]))
    writer.add_planes(dict(list(planes.items())[5:]))  # in two calls, as the contract allows
    return m, planes, writer.finish()


def ome_of(path: Path) -> OME:
    with tifffile.TiffFile(path) as tif:
        return from_xml(tif.ome_metadata or tif.pages[0].description)  # type: ignore[union-attr]


def map_of(ome: OME, namespace: str, image: int = 0) -> dict[str, str]:
    refs = {r.id for r in ome.images[image].annotation_refs}
    for ann in ome.structured_annotations.map_annotations:
        if ann.namespace == namespace and ann.id in refs:
            return dict(ann.value)
    raise AssertionError(f"no {namespace} map annotation on image {image}")


def check_channels_and_time(ome: OME, m: OpenManifest, image: int = 0) -> None:
    pixels = ome.images[image].pixels
    assert [c.name for c in pixels.channels] == list(m.channels)
    assert [c.color.as_hex(format="long").upper() for c in pixels.channels] == [
        f"#{c}" for c in COLORS
    ]
    assert pixels.time_increment == 30.0
    kv = map_of(ome, METADATA_NS, image)
    assert kv["well"] == "B7" and kv["plate"] == "corning-96" and kv["condition"] == "drug A"
    assert kv["first_time_point"] == "2" and kv["objective"] == "10x"


def check_position_planes(ome: OME, image: int, index: int, m: OpenManifest, planes: Any) -> None:
    seen = ome.images[image].pixels.planes
    assert len(seen) == m.size_t * m.size_c * m.size_z
    for plane in seen:
        meta = planes[TileKey(index, plane.the_z, plane.the_c, plane.the_t)]
        assert (plane.position_x, plane.position_y, plane.position_z) == pytest.approx(
            (meta.x_um, meta.y_um, meta.z_um)
        )
        assert plane.exposure_time == pytest.approx(meta.exposure_ms)
        assert plane.delta_t == pytest.approx(meta.delta_t_s)


def test_archive_keeps_every_measurement(tmp_path: Path) -> None:
    m, planes, stored = store("archive", tmp_path)
    ome = ome_of(Path(stored.location))
    assert len(ome.images) == len(m.positions)
    for i, position in enumerate(m.positions):
        check_channels_and_time(ome, m, i)
        check_position_planes(ome, i, position.index, m, planes)
        planned = map_of(ome, METADATA_NS, i)["planned_position"]
        assert planned == f"{position.x_um:g} {position.y_um:g} {position.z_um:g} um"


def test_per_position_ome_tiff_rewrites_its_metadata_with_the_measurements(
    tmp_path: Path,
) -> None:
    m, planes, stored = store("ome_tiff", tmp_path)
    files = sorted(Path(stored.location).glob("*.ome.tif"))
    assert len(files) == len(m.positions)
    for position, path in zip(m.positions, files, strict=True):
        ome = ome_of(path)
        check_channels_and_time(ome, m)
        check_position_planes(ome, 0, position.index, m, planes)
        label = ome.images[0].stage_label
        assert label is not None and (label.x, label.y) == (position.x_um, position.y_um)
        with tifffile.TiffFile(path) as tif:  # the pixels are untouched by the rewrite
            assert tif.series[0].shape[-2:] == (m.tile_height, m.tile_width)


def test_stitched_tiff_has_mosaic_planes_and_every_tile_measured(tmp_path: Path) -> None:
    m, planes, stored = store("stitched_tiff", tmp_path)
    ome = ome_of(Path(stored.location))
    check_channels_and_time(ome, m)
    for plane in ome.images[0].pixels.planes:
        tiles = [
            planes[TileKey(p.index, plane.the_z, plane.the_c, plane.the_t)] for p in m.positions
        ]
        assert plane.position_z == pytest.approx(np.mean([t.z_um for t in tiles]))
        assert plane.exposure_time == pytest.approx(20.0 + plane.the_c)
        assert plane.delta_t == pytest.approx(min(t.delta_t_s for t in tiles))
        assert plane.position_x == pytest.approx(min(p.x_um for p in m.positions))
    per_tile = map_of(ome, MEASURED_NS)
    assert len(per_tile) == m.tile_count
    first = planes[TileKey(4, 1, 0, 0)]
    assert per_tile["tile 4 z1 c0 t0"].startswith(
        f"stage {first.x_um:g} {first.y_um:g} {first.z_um:g} um; exposure 20 ms"
    )


def test_ome_zarr_has_the_time_axis_colours_and_the_measurements(tmp_path: Path) -> None:
    m, planes, stored = store("ome_zarr", tmp_path)
    group = zarr.open_group(stored.location, mode="r", zarr_format=3)
    attrs = group.attrs.asdict()
    multiscale = attrs["ome"]["multiscales"][0]
    assert multiscale["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    scale, translation = multiscale["datasets"][0]["coordinateTransformations"]
    assert scale["scale"][0] == 30.0 and translation["translation"][0] == 60.0
    assert [c["color"] for c in attrs["ome"]["omero"]["channels"]] == list(COLORS)
    kept = {tuple(p["tile"]): p for p in attrs["tilebridge"]["planes"]}
    assert len(kept) == m.tile_count
    assert kept[(2, 1, 1, 0)]["z_um"] == planes[TileKey(2, 1, 1, 0)].z_um
    assert attrs["tilebridge"]["key_values"]["well"] == "B7"


def test_a_tile_without_measurements_keeps_its_planned_position(tmp_path: Path) -> None:
    m = manifest()
    some = {TileKey(0, 0, 0, 0): PlaneMeta(z_um=55.0)}
    writer = registry.create("archive", folder=tmp_path).open_image("scope-1", m)
    for key, pixels in make_tiles(m).items():
        writer.write_tile(key, pixels)
    writer.add_planes(some)
    ome = ome_of(Path(writer.finish().location))
    first, other = ome.images[0].pixels.planes[0], ome.images[0].pixels.planes[1]
    assert (first.position_x, first.position_z) == (m.positions[0].x_um, 55.0)
    assert (other.position_z, other.exposure_time, other.delta_t) == (0.0, None, None)


def test_mosaic_planes_leave_out_what_tiles_disagree_on() -> None:
    m = manifest()
    planes = {
        TileKey(0): PlaneMeta(exposure_ms=10.0),
        TileKey(1): PlaneMeta(exposure_ms=12.0, delta_t_s=4.0),
    }
    first = mosaic_planes(m, planes, 0.0, 0.0)[0]
    assert first.exposure_ms is None  # 10 and 12 ms: no single exposure for the plane
    assert first.delta_t_s == 4.0

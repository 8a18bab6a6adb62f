"""The writer driven exactly as ImSwitch's normal and performance modes drive it
(`imswitch_like`), every scan shape, through a real agent's fast path (`conftest`): what the
server stream gets read from the agent's spool, ImSwitch's local files written by the agent
where ImSwitch looks; each output read back and checked pixel for pixel against the frames
at the positions their stage x/y says, metadata with ome-types / NGFF validation.
(tests/imswitch/test_end_to_end.py runs the same through `edge-agent run`, Mosquitto, the
ingest and OMERO.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.imswitch.checks import (
    Scan,
    check_frame_tiffs,
    check_live_zarr,
    check_mosaic_tiff,
)
from tests.imswitch.conftest import Agent
from tests.imswitch.imswitch_like import (
    HUB_EXTRAS,
    Camera,
    Run,
    area,
    normal_mode,
    performance_mode,
)
from tilebridge_imswitch import OMEWriter
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest

EVERYTHING = {
    "write_zarr": True,
    "write_stitched_tiff": True,
    "write_tiff": True,
    "write_individual_tiffs": True,
}


def check_local(writer: OMEWriter, scan: Scan, flags: dict[str, bool] = EVERYTHING) -> OpenManifest:
    [m] = writer.manifests
    base = Path(writer.file_paths.base_dir)  # type: ignore[attr-defined]
    folder, stem = base.parent, m.image_name
    if flags.get("write_zarr"):
        assert writer.store == str(folder / f"{stem}.ome.zarr") == writer.get_zarr_url()
        check_live_zarr(Path(writer.store), m, scan)
    if flags.get("write_stitched_tiff"):
        check_mosaic_tiff(folder / stem / "stitched.ome.tif", m, scan)
    if flags.get("write_tiff"):
        check_mosaic_tiff(folder / stem / f"{stem}.ome.tif", m, scan)
    if flags.get("write_individual_tiffs"):
        check_frame_tiffs(folder / stem / "tiles", m, scan)
    return m


def check_stream(agent: Agent, writer: OMEWriter, scan: Scan) -> OpenManifest:
    """What the server stream got: every frame taken, at the position its stage x/y says,
    listed by the close manifest; nothing where no frame was taken."""
    [m] = writer.manifests
    tiles = agent.tiles(m.image_id)
    close = agent.close(m.image_id)
    assert close is not None and {d.tile for d in close.digests} == set(tiles)
    assert set(tiles) == scan.taken_keys(m)
    for key, pixels in tiles.items():
        ix, iy = key.index % scan.nx, key.index // scan.nx
        np.testing.assert_array_equal(pixels, scan.frame(ix, iy, key.z, key.c))
    return m


def scan_of(
    run: Run, points: Any, camera: Camera, t: int = 0, area_index: int = 0, **kw: Any
) -> Scan:
    writer = run.writers[t, area_index]
    [m] = writer.manifests
    nx = len({p.ix for p in points})
    ny = len({p.iy for p in points})
    return Scan(
        nx=nx, ny=ny, x0=min(p.x for p in points), y0=min(p.y for p in points),
        step=(camera.width * m.pixel_size.x_um, camera.height * m.pixel_size.y_um),
        pixel_um=m.pixel_size.x_um, camera=camera, time_point=t, area=area_index,
        channels=kw.get("channels", 1), planes=kw.get("planes", 1),
    )  # fmt: skip


@pytest.mark.parametrize("snake", [True, False], ids=["snake", "raster"])
def test_snake_and_raster_scans_land_right(agent: Agent, tmp_path: Path, snake: bool) -> None:
    camera = Camera(48, 64)
    points = area(1000.0, 2000.0, 4, 3, (64 * 0.5, 48 * 0.5), snake=snake)
    run = normal_mode(tmp_path, [points], camera, pixel_size=0.5, flags=EVERYTHING)
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = scan_of(run, points, camera)
    check_stream(agent, writer, scan)
    m = check_local(writer, scan)
    close = agent.close(m.image_id)
    assert close is not None and not close.partial and close.not_planned == ()  # nothing left out
    # ImSwitch reads `store` after every frame and tells its live view about each chunk.
    assert set(run.stores_seen) == {writer.store}
    assert all(info["rel_chunk"].startswith("0/0/0/0/") for info in run.chunk_infos)
    cells = [info["grid_pos"] for info in run.chunk_infos]
    assert cells == [(p.ix, p.iy) for p in points]  # in acquisition order


def test_a_round_area_finalizes_with_the_frames_that_exist(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(32, 40)
    # A round area: corners of the 5 x 5 grid never taken.
    inside = lambda ix, iy: (ix - 2) ** 2 + (iy - 2) ** 2 <= 5  # noqa: E731
    points = area(0.0, 0.0, 5, 5, (40.0, 32.0), keep=inside)
    assert len(points) == 21
    run = normal_mode(tmp_path, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = scan_of(run, points, camera)
    check_stream(agent, writer, scan)
    check_local(writer, scan)
    [m] = writer.manifests
    assert len(m.positions) == 25
    # The corners were never planned: the image is complete without them, not incomplete.
    close = agent.close(m.image_id)
    assert close is not None and close.not_planned == (0, 4, 20, 24) and not close.partial


def test_a_time_lapse_of_per_time_point_writers(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(24, 32)
    areas = [area(0.0, 0.0, 2, 2, (32.0, 24.0)), area(500.0, 0.0, 2, 1, (32.0, 24.0))]
    run = normal_mode(
        tmp_path, areas, camera, n_times=3, flags={"write_zarr": True}, time_interval=30.0,
        area_names=("A1", "B1"),
    )  # fmt: skip
    assert run.refused == [] and len(run.writers) == 6
    for (t, index), writer in run.writers.items():
        scan = scan_of(run, areas[index], camera, t, index)
        m = check_stream(agent, writer, scan)
        assert (m.size_t, m.first_time_point, m.time_interval_s) == (1, t, 30.0)
        assert m.key_values["area"] == ("A1", "B1")[index]
        attrs = check_live_zarr(Path(writer.store or ""), m, scan)
        transform = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert transform[0]["scale"][0] == 30.0
        assert transform[1]["translation"][0] == 30.0 * t  # placed in time too
    names = {w.manifests[0].image_name for w in run.writers.values()}
    assert len(names) == 6  # one set of files per writer, as ImSwitch names them


def test_two_channels_by_three_planes(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(32, 32)
    points = area(0.0, 0.0, 2, 2, (32.0, 32.0))
    run = normal_mode(
        tmp_path, [points], camera, z_offsets=(-2.0, 0.0, 2.0), sources=("LED", "Laser 488"),
        flags=EVERYTHING,
    )  # fmt: skip
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = scan_of(run, points, camera, channels=2, planes=3)
    m = check_stream(agent, writer, scan)
    check_local(writer, scan)
    assert m.channels == ("LED", "Laser 488") and m.size_z == 3
    planes = agent.planes(m.image_id)
    plane = planes[TileKey(0, 2, 1, 0)]
    assert plane is not None and plane.z_um == 102.0  # the frame's stage z, per plane
    assert plane.exposure_ms == 21.0
    for key, value in HUB_EXTRAS.items():
        assert m.key_values[key] == str(value)  # ImSwitch's extra metadata, kept


def test_an_8_bit_camera_keeps_its_dtype(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(24, 24, dtype=np.uint8)
    points = area(0.0, 0.0, 3, 1, (24.0, 24.0))
    run = normal_mode(tmp_path, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = scan_of(run, points, camera)
    m = check_stream(agent, writer, scan)
    check_local(writer, scan)
    assert m.dtype.value == "uint8"


def test_an_rgb_camera_is_three_channels(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(24, 32, dtype=np.uint8, rgb=True)
    points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
    run = normal_mode(tmp_path, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = scan_of(run, points, camera)
    m = check_stream(agent, writer, scan)
    check_local(writer, scan)
    assert m.channels == ("R", "G", "B")
    assert m.channel_colors == ("FF0000", "00FF00", "0000FF")


def test_performance_mode_names_channels_from_the_frames(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(32, 32)
    run = performance_mode(
        tmp_path, camera, nx=3, ny=2, nz=2, illumination={"illumination0": 200, "led": 255},
        flags={"write_zarr": True, "write_stitched_tiff": True},
    )  # fmt: skip
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = Scan(3, 2, 0.0, 0.0, (100.0, 100.0), 1.0, camera, 0, 0, channels=2, planes=2)
    [m] = writer.manifests
    assert m.channels == ("illumination0", "led")
    check_stream(agent, writer, scan)
    check_local(writer, scan, {"write_zarr": True, "write_stitched_tiff": True})


def test_two_performance_scans_in_one_second_do_not_share_files(
    agent: Agent, tmp_path: Path
) -> None:
    camera = Camera(16, 16)
    run = performance_mode(tmp_path, camera, nx=2, ny=1, step=(16.0, 16.0, 1.0), n_times=2)
    first, second = (run.writers[t, 0] for t in range(2))
    assert first.store != second.store
    for t, writer in enumerate((first, second)):
        scan = Scan(2, 1, 0.0, 0.0, (16.0, 16.0), 1.0, camera, t, 0, 1, 1)
        check_local(writer, scan, {"write_zarr": True})


def test_a_frame_that_matches_no_position_is_refused_with_the_reason(
    agent: Agent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    camera = Camera(16, 16)
    points = area(0.0, 0.0, 2, 2, (16.0, 16.0))
    run = normal_mode(tmp_path, [points], camera)
    writer = OMEWriter(
        run.writers[0, 0].file_paths, (16, 16), (2, 2), (0.0, 0.0, 16.0, 16.0),
        run.writers[0, 0].config,
    )  # fmt: skip
    good = {"x": 16.0, "y": 0.0, "z": 0.0, "channel_index": 0, "z_index": 0}
    writer.write_frame(camera.snap("good"), good)
    with caplog.at_level(logging.ERROR):
        for x, y in ((8.0, 0.0), (48.0, 0.0), (16.0, -16.0)):
            with pytest.raises(Exception, match=r"matches no planned position"):
                writer.write_frame(camera.snap(x, y), {**good, "x": x, "y": y})
    assert writer.frames_refused == 3
    assert "the nearest, (0, 0) µm, is 8.0 µm away" in caplog.text  # says how far off
    assert "is 16.0 µm away" in (writer.last_refusal or "")
    [m] = writer.manifests
    assert list(agent.tiles(m.image_id)) == [TileKey(1, 0, 0, 0)]  # nothing misplaced


def test_finalize_twice_and_a_frame_after_it(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(16, 16)
    points = area(0.0, 0.0, 1, 1, (16.0, 16.0))
    run = normal_mode(tmp_path, [points], camera)
    writer = run.writers[0, 0]  # normal_mode already finalized it twice, as ImSwitch does
    writer.finalize()
    with pytest.raises(Exception, match="finalized"):
        writer.write_frame(camera.snap("late"), {"x": 0.0, "y": 0.0})
    [m] = writer.manifests
    assert agent.app.spool.image(m.image_id).state == "finalized"

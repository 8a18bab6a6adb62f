"""ImSwitch's scans through the real parts: `tilebridge_imswitch.OMEWriter` driven as ImSwitch's
normal and performance modes drive it (`imswitch_like`), the real `edge-agent run` program
over its fast path (the adapter's default wiring, made by its composition root from
settings), a real Mosquitto from the repo's config, the ingest writing its archive and OMERO
(the stand-in, over real Ice, through unmodified omero-py). Every output, the local files
the agent writes where ImSwitch looks, the archive and OMERO, is read back and checked pixel
for pixel against the frames at the positions their stage x/y says; metadata with ome-types,
NGFF validation and OMERO's own objects (PlaneInfo, Pixels, channels, key-values). One stack
per module, many scans through it.

The last test runs the agent inside the process instead (`edge: in_process`): the same front
door, the same answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("omero")

from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, agent_program, wait_for
from edge_agent.fastpath_client import FastPathClient
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings
from tests.imswitch.checks import (
    Scan,
    check_archive,
    check_frame_tiffs,
    check_live_zarr,
    check_mosaic_tiff,
    check_omero,
)
from tests.imswitch.imswitch_like import (
    HUB_EXTRAS,
    Camera,
    Point,
    Run,
    area,
    normal_mode,
    performance_mode,
)
from tests.omero.helpers import key_values, settings_for
from tests.omero_standin.fixtures import OmeroTarget, import_omero_quietly
from tilebridge_imswitch import OMEWriter, root
from tilebridge_imswitch.port import SERVER
from tilebridge_imswitch.settings import AdapterSettings
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.topics import image_status_topic
from tilebridge_runtime.mqtt import BrokerSettings
from tilebridge_storage.omero_backend.metadata import METADATA_NS
from tilebridge_storage.testing import ome_key_values

pytestmark = [pytest.mark.omero, pytest.mark.slow]
EVERYTHING = {
    "write_zarr": True,
    "write_stitched_tiff": True,
    "write_tiff": True,
    "write_individual_tiffs": True,
}


@dataclass
class Stack:
    broker: Mosquitto
    omero: OmeroTarget
    ingest: IngestService
    agent: Program
    socket: Path
    root: Path
    conn: Any

    @property
    def data(self) -> Path:
        """ImSwitch's data folder: the agent's `local_output_root`, where it writes."""
        return self.root / "data"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import_omero_quietly()
    from tests.omero_standin.server import OmeroStandin

    where = tmp_path_factory.mktemp("imswitch-stack")
    server = OmeroStandin()
    server.start()
    user = next(iter(server.users.values()))
    target = OmeroTarget(server.host, server.port, user.name, user.password, user.group, server)
    broker = Mosquitto(where / "broker").start()
    ingest = IngestService(
        IngestSettings(
            broker=BrokerSettings(port=broker.port),
            data_dir=where / "ingest",
            backends=("archive", "omero"),
            omero=settings_for(target),
            status_interval_s=0.5,
        )
    ).start()
    socket = where / "acquire.sock"
    (where / "data").mkdir()
    agent = agent_program(
        broker, where, local_socket=str(socket), local_output_root=str(where / "data"),
        commit_timeout_s=2.0, max_commit_timeout_s=4.0,
    ).start("run")  # fmt: skip
    try:
        wait_for(lambda: _answers(socket), 60, "the agent's fast path")
        yield Stack(broker, target, ingest, agent, socket, where, target.connect())
    finally:
        root.close()
        agent.stop()
        ingest.stop()
        broker.stop()
        target.close_all()
        server.close()


@pytest.fixture
def adapter(stack: Stack) -> Iterator[Stack]:
    """The adapter as an ImSwitch install runs it: settings only (the default edge, the
    fast path, at the agent's socket), the root wires the rest."""
    root.configure(
        AdapterSettings(edge_socket=stack.socket, finalize_grace_s=0.2, project="imswitch")
    )
    yield stack
    root.close()


@pytest.fixture
def data(stack: Stack, tmp_path: Path) -> Path:
    """This test's ImSwitch data folder, under the agent's output root."""
    folder = stack.data / tmp_path.name
    folder.mkdir()
    return folder


def _answers(socket: Path) -> bool:
    try:
        with FastPathClient(socket, timeout=2) as client:
            return client.status().device == "scope-1"
    except Exception:
        return False


def pixels_of(conn: Any, image_id: int) -> tuple[float | None, list[tuple[int, int, int]]]:
    """An image's time increment (s) and channel colours (RGB), as OMERO holds them."""
    import omero

    [pixels] = conn.c.sf.getQueryService().findAllByQuery(
        "select p from Pixels p join fetch p.channels where p.image.id = :id",
        omero.sys.ParametersI().addId(image_id),
    )
    increment = pixels.getTimeIncrement()
    channels = sorted(pixels.copyChannels(), key=lambda c: c.getId().getValue())
    colors = [
        (c.getRed().getValue(), c.getGreen().getValue(), c.getBlue().getValue()) for c in channels
    ]
    return (None if increment is None else increment.getValue()), colors


def plane_infos(conn: Any, image_id: int) -> dict[tuple[int, int, int], tuple[Any, ...]]:
    """OMERO's PlaneInfo of an image: (t, c, z) -> (PositionX, Y, Z, ExposureTime, DeltaT)."""
    import omero

    def value(quantity: Any) -> Any:
        return None if quantity is None else quantity.getValue()

    planes = conn.c.sf.getQueryService().findAllByQuery(
        "select p from PlaneInfo p where p.pixels.image.id = :id",
        omero.sys.ParametersI().addId(image_id),
    )
    return {
        (p.getTheT().getValue(), p.getTheC().getValue(), p.getTheZ().getValue()): (
            value(p.getPositionX()), value(p.getPositionY()), value(p.getPositionZ()),
            value(p.getExposureTime()), value(p.getDeltaT()),
        )
        for p in planes
    }  # fmt: skip


def stored(writer: OMEWriter, timeout: float = 120) -> dict[str, str]:
    """Wait until the server stored the writer's image; its locations by backend."""

    def done() -> Any:
        [progress] = writer.progress()
        server = progress.targets[SERVER]
        assert server.state != "failed", server.error
        return server.location if server.state == "finished" else None

    location = wait_for(done, timeout, f"the server to store {writer.manifests[0].image_name}")
    return dict(part.split(": ", 1) for part in location.split("; "))


def image_status(stack: Stack, m: OpenManifest) -> dict[str, Any]:
    """The image's retained status on the broker, as a monitor reads it once it is done."""
    topic = image_status_topic("scope-1", m.image_id)
    watcher = Watcher(stack.broker, topic)
    try:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (s := watcher.latest(topic)) and s["phase"] == "complete" and s,
            30, f"the status of {m.image_name}",
        )  # fmt: skip
    finally:
        watcher.close()


def scan_of(
    run: Run, points: list[Point], camera: Camera, t: int = 0, channels: int = 1, planes: int = 1
) -> Scan:
    """What the test knows of the scan of the (one) area at time point t."""
    [m] = run.writers[t, 0].manifests
    return Scan(
        nx=len({p.ix for p in points}), ny=len({p.iy for p in points}),
        x0=min(p.x for p in points), y0=min(p.y for p in points),
        step=(camera.width * m.pixel_size.x_um, camera.height * m.pixel_size.y_um),
        pixel_um=m.pixel_size.x_um, camera=camera, time_point=t, area=0,
        channels=channels, planes=planes,
    )  # fmt: skip


def check_everywhere(
    stack: Stack, writer: OMEWriter, scan: Scan, flags: dict[str, bool] = EVERYTHING
) -> tuple[OpenManifest, int]:
    """Local files, the archive and OMERO all hold the frames where their x/y says."""
    [m] = writer.manifests
    base = Path(writer.file_paths.base_dir)  # type: ignore[attr-defined]
    folder, stem = base.parent, m.image_name
    if flags.get("write_zarr"):
        check_live_zarr(folder / f"{stem}.ome.zarr", m, scan)
    if flags.get("write_stitched_tiff"):
        check_mosaic_tiff(folder / stem / "stitched.ome.tif", m, scan)
    if flags.get("write_tiff"):
        check_mosaic_tiff(folder / stem / f"{stem}.ome.tif", m, scan)
    if flags.get("write_individual_tiffs"):
        check_frame_tiffs(folder / stem / "tiles", m, scan)
    locations = stored(writer)
    ome = check_archive(Path(locations["archive"]), m, scan)
    assert [c.name for c in ome.images[0].pixels.channels] == list(m.channels)
    image_id = writer.get_omero_image_id()
    assert image_id is not None and writer.get_omero_dataset_id() is not None
    assert locations["omero"].startswith(f"omero:Image:{image_id} ")
    check_omero(stack.conn, image_id, m, scan)
    return m, image_id


@pytest.mark.parametrize("snake", [True, False], ids=["snake", "raster"])
def test_snake_and_raster_scans_land_right_everywhere(
    adapter: Stack, data: Path, snake: bool
) -> None:
    camera = Camera(48, 64)
    points = area(10_000.0, 5_000.0, 4, 3, (64 * 0.5, 48 * 0.5), snake=snake)
    run = normal_mode(data, [points], camera, pixel_size=0.5, flags=EVERYTHING)
    assert run.refused == []
    m, image_id = check_everywhere(adapter, run.writers[0, 0], scan_of(run, points, camera))
    kv = key_values(adapter.conn, image_id, METADATA_NS)
    for key, value in HUB_EXTRAS.items():
        assert kv[key] == str(value)  # ImSwitch's extra metadata kept as key-values
    assert kv["time_point"] == "0" and kv["base_dir"].endswith(m.image_name)


def test_a_round_area_with_holes_is_sparse_complete_and_not_flagged(
    adapter: Stack, data: Path
) -> None:
    camera = Camera(32, 40)
    inside = lambda ix, iy: (ix - 2) ** 2 + (iy - 2) ** 2 <= 5  # noqa: E731
    points = area(0.0, 0.0, 5, 5, (40.0, 32.0), keep=inside)
    run = normal_mode(data, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    # Every output: the holes black on the canvases, absent from per-frame files and the
    # archive (check_everywhere), nothing flagged incomplete anywhere.
    m, image_id = check_everywhere(adapter, run.writers[0, 0], scan_of(run, points, camera))
    corners = "0, 4, 20, 24"
    kv = key_values(adapter.conn, image_id, METADATA_NS)
    assert kv["tilebridge.not_planned"] == corners and "tilebridge.incomplete" not in kv
    ome = check_archive(Path(stored(run.writers[0, 0])["archive"]), m, scan_of(run, points, camera))
    archived = ome_key_values(ome)
    assert archived["tilebridge.not_planned"] == corners and "tilebridge.incomplete" not in archived
    status = image_status(adapter, m)
    assert status["phase"] == "complete" and status["incomplete"] is False
    assert (status["tiles_stored"], status["tiles_not_planned"]) == (21, 4)


def test_a_stopped_scan_is_stored_incomplete_and_flagged(adapter: Stack, data: Path) -> None:
    """Performance mode finalizes a stopped scan (ExperimentController.py:2940-2976): the
    frames that never came are missing, so the image is partial, flagged everywhere."""
    camera = Camera(16, 16)
    run = performance_mode(
        data, camera, nx=3, ny=2, step=(16.0, 16.0, 1.0), stop_after=4,
        flags={"write_zarr": True},
    )  # fmt: skip
    scan = Scan(3, 2, 0.0, 0.0, (16.0, 16.0), 1.0, camera, 0, 0, 1, 1)
    m, image_id = check_everywhere(adapter, run.writers[0, 0], scan, {"write_zarr": True})
    kv = key_values(adapter.conn, image_id, METADATA_NS)
    assert (kv["tilebridge.incomplete"], kv["tilebridge.tiles"]) == ("true", "4/6")
    store = Path(run.writers[0, 0].store or "")
    assert check_live_zarr(store, m, scan)["tilebridge"]["key_values"]["tilebridge.tiles"] == "4/6"
    status = image_status(adapter, m)
    assert status["incomplete"] is True and status["tiles_stored"] == 4


def test_a_three_point_time_lapse_of_per_time_point_writers(adapter: Stack, data: Path) -> None:
    camera = Camera(24, 32)
    points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
    well = {"wellRow": "C", "wellColumn": 4, "labwareLoadName": "corning 96", "conditionLabel": "x"}
    run = normal_mode(
        data, [points], camera, n_times=3, flags={"write_zarr": True}, time_interval=30.0,
        well=well, area_names=("C4",),
    )  # fmt: skip
    assert run.refused == []
    images = set()
    for t in range(3):
        scan = scan_of(run, points, camera, t)
        m, image_id = check_everywhere(adapter, run.writers[t, 0], scan, {"write_zarr": True})
        assert (m.first_time_point, m.dataset) == (t, "corning 96")  # a dataset per plate
        kv = key_values(adapter.conn, image_id, METADATA_NS)
        assert (kv["time_point"], kv["time_points"], kv["time_interval_s"]) == (str(t), "3", "30")
        assert (kv["plate"], kv["well"], kv["area"]) == ("corning 96", "C4", "C4")
        # The manifest's fields reached OMERO as OMERO's own: time increment, channel colour.
        increment, colors = pixels_of(adapter.conn, image_id)
        assert (increment, colors) == (30.0, [(0, 255, 0)])  # ImSwitch's first default colour
        images.add(image_id)
    assert len(images) == 3  # one OMERO image per time point (docs/imswitch.md says why)


def test_two_channels_by_three_z_planes_with_every_frames_measurements(
    adapter: Stack, data: Path
) -> None:
    """Each frame's measured stage x/y/z, exposure and time (PlaneMeta) reach the local files,
    the archive's OME planes and OMERO's PlaneInfo."""
    camera = Camera(32, 32)
    points = area(0.0, 0.0, 2, 2, (32.0, 32.0))
    start = datetime(2026, 12, 1, 10, 15, tzinfo=UTC)
    run = normal_mode(
        data, [points], camera, z_offsets=(-2.0, 0.0, 2.0), sources=("LED", "Laser 488"),
        flags=EVERYTHING,
        frame_extras=lambda step: {"timestamp": (start + timedelta(seconds=step)).isoformat()},
    )  # fmt: skip
    assert run.refused == []
    writer = run.writers[0, 0]
    scan = scan_of(run, points, camera, channels=2, planes=3)
    m, image_id = check_everywhere(adapter, writer, scan)
    assert m.channels == ("LED", "Laser 488") and m.acquired_at == start + timedelta(seconds=1)
    # Frames in acquisition order: position, then z, then channel (imswitch_like.normal_mode).
    step_of = {
        (n, z, c): 1 + (n * 3 + z) * 2 + c for n in range(4) for z in range(3) for c in range(2)
    }
    order = {(p.ix, p.iy): n for n, p in enumerate(points)}
    folder = Path(writer.file_paths.base_dir).parent  # type: ignore[attr-defined]
    ome = check_mosaic_tiff(folder / m.image_name / f"{m.image_name}.ome.tif", m, scan)
    z_of = {(p.the_c, p.the_z): p.position_z for p in ome.images[0].pixels.planes}
    assert z_of == {(c, z): 98.0 + 2.0 * z for c in range(2) for z in range(3)}
    # The archive: one OME image per position, each plane as measured.
    archive = check_archive(Path(stored(writer)["archive"]), m, scan)
    for image in archive.images:
        index = int((image.name or "").rsplit(" ", 1)[1])
        ix, iy = index % 2, index // 2
        for plane in image.pixels.planes:
            step = step_of[order[ix, iy], plane.the_z, plane.the_c]
            assert (plane.position_x, plane.position_y) == (ix * 32.0, iy * 32.0)
            assert plane.position_z == 98.0 + 2.0 * plane.the_z
            assert plane.exposure_time == 20.0 + plane.the_c
            assert plane.delta_t == step - 1  # from the image's start, its first frame
    # OMERO: one PlaneInfo per mosaic plane; z and exposure as measured, DeltaT the earliest.
    infos = plane_infos(adapter.conn, image_id)
    for (t, c, z), (x, y, pz, exposure, delta_t) in infos.items():
        assert (t, x, y) == (0, 0.0, 0.0)  # the canvas origin
        assert (pz, exposure) == (98.0 + 2.0 * z, 20.0 + c)
        assert delta_t == min(step_of[n, z, c] for n in range(4)) - 1
    assert len(infos) == 6


def test_an_8_bit_camera(adapter: Stack, data: Path) -> None:
    camera = Camera(24, 24, dtype=np.uint8)
    points = area(0.0, 0.0, 3, 1, (24.0, 24.0))
    run = normal_mode(data, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    m, _ = check_everywhere(adapter, run.writers[0, 0], scan_of(run, points, camera))
    assert m.dtype.value == "uint8"


def test_an_rgb_camera(adapter: Stack, data: Path) -> None:
    camera = Camera(24, 32, dtype=np.uint8, rgb=True)
    points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
    run = normal_mode(data, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    m, _ = check_everywhere(adapter, run.writers[0, 0], scan_of(run, points, camera))
    assert m.channels == ("R", "G", "B")


def test_performance_mode_without_channel_names(adapter: Stack, data: Path) -> None:
    camera = Camera(32, 32)
    run = performance_mode(
        data, camera, nx=3, ny=2, nz=2, illumination={"illumination0": 200, "led": 255},
        flags={"write_zarr": True, "write_stitched_tiff": True},
    )  # fmt: skip
    assert run.refused == []
    scan = Scan(3, 2, 0.0, 0.0, (100.0, 100.0), 1.0, camera, 0, 0, channels=2, planes=2)
    m, _ = check_everywhere(
        adapter, run.writers[0, 0], scan, {"write_zarr": True, "write_stitched_tiff": True}
    )
    assert m.channels == ("illumination0", "led")


def test_a_frame_whose_stage_position_matches_nothing(adapter: Stack, data: Path) -> None:
    camera = Camera(16, 16)
    points = area(0.0, 0.0, 2, 1, (16.0, 16.0))
    run = normal_mode(data, [points], camera, flags={"write_zarr": True})
    writer = OMEWriter(
        run.writers[0, 0].file_paths, (16, 16), (2, 1), (0.0, 0.0, 16.0, 16.0),
        run.writers[0, 0].config,
    )  # fmt: skip
    meta = {"z_index": 0, "channel_index": 0, "time_index": 0}
    writer.write_frame(camera.snap(0, 0, 0, 0, 0, 9), {"x": 0.0, "y": 0.0, **meta})
    with pytest.raises(Exception, match="matches no planned position"):
        writer.write_frame(camera.snap("stray"), {"x": 40.0, "y": 0.0, **meta})
    writer.finalize()
    [m] = writer.manifests
    locations = stored(writer)
    # Stored without the stray frame: position 0 as taken; the refused frame was meant for
    # some cell, so the image is partial (flagged), never a complete sparse image.
    import tifffile

    with tifffile.TiffFile(locations["archive"]) as tif:
        [series] = tif.series
        np.testing.assert_array_equal(series.asarray(), camera.taken[0, 0, 0, 0, 0, 9])
    assert m.tile_count == 2
    image_id = writer.get_omero_image_id()
    assert image_id is not None
    kv = key_values(adapter.conn, image_id, METADATA_NS)
    assert (kv["tilebridge.incomplete"], kv["tilebridge.tiles"]) == ("true", "1/2")


def test_the_in_process_agent_carries_the_whole_manifest_to_omero(
    stack: Stack, tmp_path: Path
) -> None:
    agent_config = tmp_path / "edge.json"
    agent_config.write_text(
        json.dumps(
            {
                "device_id": "scope-2",
                "broker": {"port": stack.broker.port},
                "spool_dir": str(tmp_path / "spool"),
                "local_output_root": str(tmp_path),
                "fast_path": False,
                "min_free_bytes": 0,
                "status_interval_s": 1.0,
            }
        )
    )
    root.configure(
        AdapterSettings(edge="in_process", agent_config=agent_config, finalize_grace_s=0.2)
    )
    try:
        camera = Camera(24, 32)
        points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
        well = {"wellRow": "B", "wellColumn": 2, "labwareLoadName": "plate-7"}
        run = normal_mode(
            tmp_path, [points], camera, n_times=2, sources=("LED", "Laser 488"),
            time_interval=45.0, well=well, flags={"write_zarr": True},
        )  # fmt: skip
        assert run.refused == []
        for t in range(2):
            scan = scan_of(run, points, camera, t, channels=2)
            writer = run.writers[t, 0]
            m, image_id = check_everywhere(stack, writer, scan, {"write_zarr": True})
            assert m.channel_colors == ("00FF00", "FF0000")  # ImSwitch's default colours
            [pixels] = stack.conn.c.sf.getQueryService().findAllByQuery(
                "select p from Pixels p join fetch p.channels where p.image.id = :id",
                __import__("omero").sys.ParametersI().addId(image_id),
            )
            assert pixels.getTimeIncrement().getValue() == 45.0
            channels = sorted(pixels.copyChannels(), key=lambda c: c.getId().getValue())
            assert [(c.getRed().getValue(), c.getGreen().getValue()) for c in channels] == [
                (0, 255),
                (255, 0),
            ]
            kv = key_values(stack.conn, image_id, METADATA_NS)
            assert (kv["plate"], kv["well"], kv["first_time_point"]) == ("plate-7", "B2", str(t))
    finally:
        root.close()  # stops the in-process agent

"""ImSwitch's scans through the real parts: `tilebridge_imswitch.OMEWriter` driven as ImSwitch's
normal and performance modes drive it (`imswitch_like`), the real `edge-agent run` program
over its HTTP API (the adapter's default wiring, made by its composition root from
settings), a real Mosquitto from the repo's config, the ingest writing its archive and OMERO
(the stand-in, over real Ice, through unmodified omero-py). Every output, the local files
where ImSwitch looks, the archive and OMERO, is read back and checked pixel for pixel against
the frames at the positions their stage x/y says; metadata with ome-types and NGFF
validation. One stack per module, many scans through it.

The last test runs the agent inside the process instead (`edge: in_process`), the way that
carries the whole manifest today: channel colours, time interval and well reach OMERO as
such. What no edge can carry yet is said where it is checked (measured plane metadata).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("omero")

from devtools.broker import Mosquitto, free_port
from devtools.stack import Program, agent_program, wait_for
from server_ingest.service import IngestService
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
from tilebridge_runtime.mqtt import BrokerSettings
from tilebridge_storage.omero_backend.metadata import METADATA_NS

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
    url: str
    root: Path
    conn: Any


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
    port = free_port()
    agent = agent_program(
        broker, where, http_port=port, local_output_root=str(where / "agent-output"),
        commit_timeout_s=2.0, max_commit_timeout_s=4.0,
    ).start("run")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 60, "the agent's HTTP API")
        yield Stack(broker, target, ingest, agent, url, where, target.connect())
    finally:
        root.close()
        agent.stop()
        ingest.stop()
        broker.stop()
        target.close_all()
        server.close()


@pytest.fixture
def http_adapter(stack: Stack) -> Iterator[Stack]:
    """The adapter as an ImSwitch install runs it: settings only, the root wires the rest."""
    root.configure(AdapterSettings(edge_url=stack.url, finalize_grace_s=0.2, project="imswitch"))
    yield stack
    root.close()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/status", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stored(writer: OMEWriter, timeout: float = 120) -> dict[str, str]:
    """Wait until the server stored the writer's image; its locations by backend."""

    def done() -> Any:
        [progress] = writer.progress()
        server = progress.targets[SERVER]
        assert server.state != "failed", server.error
        return server.location if server.state == "finished" else None

    location = wait_for(done, timeout, f"the server to store {writer.manifests[0].image_name}")
    return dict(part.split(": ", 1) for part in location.split("; "))


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
    http_adapter: Stack, tmp_path: Path, snake: bool
) -> None:
    camera = Camera(48, 64)
    points = area(10_000.0, 5_000.0, 4, 3, (64 * 0.5, 48 * 0.5), snake=snake)
    run = normal_mode(tmp_path, [points], camera, pixel_size=0.5, flags=EVERYTHING)
    assert run.refused == []
    m, image_id = check_everywhere(http_adapter, run.writers[0, 0], scan_of(run, points, camera))
    kv = key_values(http_adapter.conn, image_id, METADATA_NS)
    for key, value in HUB_EXTRAS.items():
        assert kv[key] == str(value)  # ImSwitch's extra metadata kept as key-values
    assert kv["time_point"] == "0" and kv["base_dir"].endswith(m.image_name)


def test_a_round_area_with_holes(http_adapter: Stack, tmp_path: Path) -> None:
    camera = Camera(32, 40)
    inside = lambda ix, iy: (ix - 2) ** 2 + (iy - 2) ** 2 <= 5  # noqa: E731
    points = area(0.0, 0.0, 5, 5, (40.0, 32.0), keep=inside)
    run = normal_mode(tmp_path, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    check_everywhere(http_adapter, run.writers[0, 0], scan_of(run, points, camera))


def test_a_three_point_time_lapse_of_per_time_point_writers(
    http_adapter: Stack, tmp_path: Path
) -> None:
    camera = Camera(24, 32)
    points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
    well = {"wellRow": "C", "wellColumn": 4, "labwareLoadName": "corning 96", "conditionLabel": "x"}
    run = normal_mode(
        tmp_path, [points], camera, n_times=3, flags={"write_zarr": True}, time_interval=30.0,
        well=well, area_names=("C4",),
    )  # fmt: skip
    assert run.refused == []
    images = set()
    for t in range(3):
        scan = scan_of(run, points, camera, t)
        m, image_id = check_everywhere(http_adapter, run.writers[t, 0], scan, {"write_zarr": True})
        assert (m.first_time_point, m.dataset) == (t, "corning 96")  # a dataset per plate
        kv = key_values(http_adapter.conn, image_id, METADATA_NS)
        assert (kv["time_point"], kv["time_points"], kv["time_interval_s"]) == (str(t), "3", "30")
        assert (kv["plate"], kv["well"], kv["area"]) == ("corning 96", "C4", "C4")
        images.add(image_id)
    assert len(images) == 3  # one OMERO image per time point (docs/imswitch.md says why)


def test_two_channels_by_three_z_planes(http_adapter: Stack, tmp_path: Path) -> None:
    camera = Camera(32, 32)
    points = area(0.0, 0.0, 2, 2, (32.0, 32.0))
    run = normal_mode(
        tmp_path, [points], camera, z_offsets=(-2.0, 0.0, 2.0), sources=("LED", "Laser 488"),
        flags=EVERYTHING,
    )  # fmt: skip
    assert run.refused == []
    scan = scan_of(run, points, camera, channels=2, planes=3)
    m, _ = check_everywhere(http_adapter, run.writers[0, 0], scan)
    assert m.channels == ("LED", "Laser 488")
    # The measured stage z reaches the local files' planes; the server keeps the planned
    # ones until the agent carries plane metadata in its close (see the report).
    folder = Path(run.writers[0, 0].file_paths.base_dir).parent  # type: ignore[attr-defined]
    ome = check_mosaic_tiff(folder / m.image_name / f"{m.image_name}.ome.tif", m, scan)
    z_of = {(p.the_c, p.the_z): p.position_z for p in ome.images[0].pixels.planes}
    assert z_of == {(c, z): 98.0 + 2.0 * z for c in range(2) for z in range(3)}


def test_an_8_bit_camera(http_adapter: Stack, tmp_path: Path) -> None:
    camera = Camera(24, 24, dtype=np.uint8)
    points = area(0.0, 0.0, 3, 1, (24.0, 24.0))
    run = normal_mode(tmp_path, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    m, _ = check_everywhere(http_adapter, run.writers[0, 0], scan_of(run, points, camera))
    assert m.dtype.value == "uint8"


def test_an_rgb_camera(http_adapter: Stack, tmp_path: Path) -> None:
    camera = Camera(24, 32, dtype=np.uint8, rgb=True)
    points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
    run = normal_mode(tmp_path, [points], camera, flags=EVERYTHING)
    assert run.refused == []
    m, _ = check_everywhere(http_adapter, run.writers[0, 0], scan_of(run, points, camera))
    assert m.channels == ("R", "G", "B")


def test_performance_mode_without_channel_names(http_adapter: Stack, tmp_path: Path) -> None:
    camera = Camera(32, 32)
    run = performance_mode(
        tmp_path, camera, nx=3, ny=2, nz=2, illumination={"illumination0": 200, "led": 255},
        flags={"write_zarr": True, "write_stitched_tiff": True},
    )  # fmt: skip
    assert run.refused == []
    scan = Scan(3, 2, 0.0, 0.0, (100.0, 100.0), 1.0, camera, 0, 0, channels=2, planes=2)
    m, _ = check_everywhere(
        http_adapter, run.writers[0, 0], scan, {"write_zarr": True, "write_stitched_tiff": True}
    )
    assert m.channels == ("illumination0", "led")


def test_a_frame_whose_stage_position_matches_nothing(http_adapter: Stack, tmp_path: Path) -> None:
    camera = Camera(16, 16)
    points = area(0.0, 0.0, 2, 1, (16.0, 16.0))
    run = normal_mode(tmp_path, [points], camera, flags={"write_zarr": True})
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
    # Stored without the stray frame: position 0 as taken, position 1 never taken (zeros).
    import tifffile

    with tifffile.TiffFile(locations["archive"]) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(), camera.taken[0, 0, 0, 0, 0, 9])
        assert not tif.series[1].asarray().any()
    assert m.tile_count == 2


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

"""OMEWriter (the Python API ImSwitch calls): config validation, the off-thread local
backends and their memory bound, failure isolation, metadata handling, the bandwidth cap."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import AliasChoices, ValidationError

from devtools.broker import Mosquitto
from edge_agent import publisher as publisher_module
from edge_agent.agent import EdgeAgent
from edge_agent.client import FRAME_FIELDS, IMSWITCH_FIELDS, frame_metadata
from edge_agent.omewriter import FrameInfo, OMEWriter, OMEWriterConfig
from edge_agent.ratelimit import TokenBucket, throttle
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.framing import Codec
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.mqtt import BrokerSettings
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage

# -- helpers shared by the edge tests -------------------------------------------------------


@dataclass
class Stack:
    broker: Mosquitto
    ingest: IngestService
    agent: EdgeAgent
    settings: AgentSettings
    root: Path

    @property
    def archive(self) -> Path:
        return self.root / "ingest" / "archive"


@contextmanager
def running_stack(root: Path, **agent_settings: Any) -> Iterator[Stack]:
    """A real Mosquitto, the ingest (archive backend) and an edge agent, in process."""
    with Mosquitto(root / "broker") as broker:
        broker_settings = BrokerSettings(port=broker.port)
        ingest = IngestService(
            IngestSettings(broker=broker_settings, data_dir=root / "ingest", status_interval_s=1)
        ).start()
        settings = AgentSettings(
            broker=broker_settings, spool_dir=root / "spool", min_free_bytes=0,
            status_interval_s=1, **agent_settings,
        )  # fmt: skip
        try:
            with EdgeAgent(settings) as agent:
                yield Stack(broker, ingest, agent, settings, root)
        finally:
            ingest.stop()


def scan_spec(scan: SyntheticScan, **overrides: Any) -> dict[str, Any]:
    """The experiment manifest of a SyntheticScan, as ImSwitch would describe it."""
    step = scan.step_px * scan.pixel_um
    spec: dict[str, Any] = {
        "experiment": "edge-test",
        "image_name": "scan",
        "tile_width": scan.tile_size,
        "tile_height": scan.tile_size,
        "dtype": "uint16",
        "pixel_size_um": scan.pixel_um,
        "z_step_um": 1.0,
        "grid": {"columns": scan.columns, "rows": scan.rows, "x_step_um": step, "y_step_um": step},
        "channels": ["DAPI", "GFP", "mCherry", "Cy5"][: scan.channels],
        "size_z": scan.z_planes,
        "key_values": {"objective": "20x"},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[EdgeAgent]:
    """An agent that is never started: its disk buffer works, nothing is published."""
    agent = EdgeAgent(AgentSettings(spool_dir=tmp_path / "spool", min_free_bytes=0))
    yield agent
    agent.buffer.close()


class GateBackend(StorageBackend):
    """Holds every write until `gate` is set; records what it got."""

    kind = "gate"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.tiles: dict[TileKey, np.ndarray[Any, Any]] = {}

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        backend = self

        class Writer(ImageWriter):
            def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
                backend.gate.wait()
                self.check_tile(key, pixels)
                backend.tiles[key] = np.array(pixels)

            def finish(self) -> StoredImage:
                self.require_complete(backend.tiles)
                return StoredImage("gate", "memory")

            def abort(self) -> None:
                backend.tiles.clear()

        return Writer(device, manifest, self.name)


class FailingBackend(StorageBackend):
    """Refuses the `fail_at`-th tile like a full disk."""

    kind = "failing"

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.aborted = False

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        backend = self

        class Writer(ImageWriter):
            count = 0

            def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
                self.count += 1
                if self.count == backend.fail_at:
                    raise TransientError("writing: No space left on device")

            def finish(self) -> StoredImage:
                return StoredImage("failing", "nowhere")

            def abort(self) -> None:
                backend.aborted = True

        return Writer(device, manifest, self.name)


SMALL = SyntheticScan(columns=3, rows=2, tile_size=64, channels=2)


def frames(scan: SyntheticScan, manifest: OpenManifest) -> dict[TileKey, np.ndarray[Any, Any]]:
    return {k: scan.frame(k) for k in manifest.tile_keys()}


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_bytes_in_flight": 10}, "max_bytes_in_flight"),
        ({"write_tif": True}, "write_tif"),
        ({"compression": "lz4"}, "compression"),
        ({"bandwidth_limit_mbps": -1}, "bandwidth_limit_mbps"),
        ({"output_dir": "relative/dir"}, "output_dir"),
        ({"omero_project": "a/b"}, "omero_project"),
        ({"layout": "diagonal"}, "layout"),
        ({"write_tiff": False, "write_omero": False}, "write_omero"),
        ({"layout": "per_tile", "write_zarr": True}, "write_zarr"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        OMEWriterConfig(**values)
    assert field in str(err.value)


def test_assignment_is_validated_and_a_refused_one_changes_nothing() -> None:
    config = OMEWriterConfig(write_zarr=True)
    with pytest.raises(ValidationError, match="compression"):
        config.compression = "lz4"  # type: ignore[assignment]
    assert config.compression == "none"
    config.write_stitched_tiff = True
    assert config.targets == ["ome_tiff", "ome_zarr", "stitched_tiff", "omero"]


def test_compression_and_bandwidth_go_to_the_agent(agent: EdgeAgent, tmp_path: Path) -> None:
    config = OMEWriterConfig(
        compression="zstd", bandwidth_limit_mbps=80, output_dir=tmp_path, write_tiff=False
    )
    OMEWriter(agent, config)
    assert agent.settings.codec is Codec.ZSTD
    assert agent.publisher.settings.codec is Codec.ZSTD
    assert agent.publisher.settings.bandwidth_limit_bytes_per_s == 10_000_000
    # Without a config the agent's own settings are kept.
    assert OMEWriter(agent).config.compression == "zstd"


# -- frames ---------------------------------------------------------------------------------


def test_every_target_gets_every_frame_from_imswitch_metadata(
    agent: EdgeAgent, tmp_path: Path
) -> None:
    backend = ArchiveBackend(tmp_path / "archive")
    gate = GateBackend()
    gate.gate.set()
    writer = OMEWriter(
        agent, OMEWriterConfig(output_dir=tmp_path), {"archive": backend, "gate": gate}
    )
    manifest = writer.start_experiment(scan_spec(SMALL))
    tiles = frames(SMALL, manifest)
    for key, pixels in tiles.items():
        pos = manifest.positions[key.index]
        # ImSwitch's own metadata dict: stage position, channel by name, no tile index.
        meta = {"x": pos.x_um + 0.3, "y": pos.y_um, "z_index": key.z,
                "illuminationChannel": manifest.channels[key.c], "runningNumber": 7}  # fmt: skip
        assert writer.write_frame(pixels, meta)
    assert not writer.write_frame(tiles[TileKey(0)], {"tile_index": 0})  # a repeat
    progress = writer.finalize(timeout=30)
    assert progress.state == "finalized"
    assert progress.frames_received == manifest.tile_count == 12
    assert {n: b.state for n, b in progress.backends.items()} == {
        "archive": "finished", "gate": "finished", "omero": "writing",
    }  # fmt: skip
    assert progress.backends["archive"].frames_written == 12
    for key, pixels in tiles.items():
        np.testing.assert_array_equal(gate.tiles[key], pixels)
    # The server stream: every frame is durable in the agent's buffer, and closed.
    assert agent.buffer.is_closed(manifest.image_id)
    assert agent.buffer.stats().tiles == 12


def test_bad_frames_are_refused_and_change_nothing(agent: EdgeAgent, tmp_path: Path) -> None:
    writer = OMEWriter(agent, OMEWriterConfig(output_dir=tmp_path, write_tiff=False))
    writer.start_experiment(scan_spec(SMALL))
    good = SMALL.frame(TileKey(0))
    refusals: list[tuple[np.ndarray[Any, Any], dict[str, Any], str]] = [
        (good[:-1], {"tile_index": 0}, "shape"),
        (good.astype(np.float32), {"tile_index": 0}, "dtype"),
        (good, {"tile_index": 6}, "outside the experiment"),
        (good, {"tile_index": 0, "channel": "Cy5"}, "not one of"),
        (good, {"tile_index": 0, "channel": "GFP", "channel_index": 0}, "channel_index 1"),
        (good, {"tile_index": 0, "pixel_size_um": 1.3}, "pixel_size_um"),
        (good, {"x": 5000.0, "y": 5000.0}, "no planned position"),
        (good, {"z_index": 0}, "tile_index, or stage"),
    ]
    for frame, meta, message in refusals:
        with pytest.raises(PermanentError, match=message):
            writer.write_frame(frame, meta)
    with pytest.raises(ValidationError, match="tile_indx"):
        writer.write_frame(good, {"tile_indx": 0})
    assert writer.progress().frames_received == 0  # type: ignore[union-attr]
    assert agent.buffer.stats().tiles == 0
    # The flat frame of the right size is a frame; a position far from the plan is noted.
    assert writer.write_frame(good.ravel(), {"tile_index": 0, "x_um": 40.0, "y_um": 0.0})
    progress = writer.progress()
    assert progress is not None and "tile 0 was acquired 40.0 µm" in progress.warnings[0]
    with pytest.raises(PermanentError, match=r"11 of 12 frames not written \(first: tile_index=0"):
        writer.finalize()
    assert writer.progress().state == "acquiring"  # type: ignore[union-attr]


def test_local_backends_run_off_the_acquisition_thread_within_the_memory_bound(
    agent: EdgeAgent, tmp_path: Path
) -> None:
    scan = SyntheticScan(columns=3, rows=2, tile_size=512)  # 512 KiB frames
    gate = GateBackend()
    config = OMEWriterConfig(output_dir=tmp_path, max_bytes_in_flight=2 * 1024 * 1024)
    writer = OMEWriter(agent, config, {"gate": gate})
    manifest = writer.start_experiment(scan_spec(scan))
    tiles = frames(scan, manifest)
    keys = list(tiles)
    # Four frames fit the bound: written while the backend is stuck, each durable at once.
    for key in keys[:4]:
        writer.write_frame(tiles[key], {"tile_index": key.index})
    assert agent.buffer.stats().tiles == 4
    assert gate.tiles == {}
    # The fifth would exceed it: write_frame waits for the backend, not longer.
    fifth = threading.Thread(
        target=writer.write_frame, args=(tiles[keys[4]], {"tile_index": keys[4].index})
    )
    fifth.start()
    fifth.join(0.5)
    assert fifth.is_alive()
    assert agent.buffer.stats().tiles == 4
    gate.gate.set()
    fifth.join(10)
    assert not fifth.is_alive()
    writer.write_frame(tiles[keys[5]], {"tile_index": keys[5].index})
    progress = writer.finalize(timeout=30)
    assert progress.backends["gate"].frames_written == 6
    for key, pixels in tiles.items():
        np.testing.assert_array_equal(gate.tiles[key], pixels)


def test_the_callers_buffer_may_be_reused_once_write_frame_returns(
    agent: EdgeAgent, tmp_path: Path
) -> None:
    gate = GateBackend()
    config = OMEWriterConfig(output_dir=tmp_path, write_omero=False)
    writer = OMEWriter(agent, config, {"gate": gate})
    manifest = writer.start_experiment(scan_spec(SMALL))
    tiles = frames(SMALL, manifest)
    camera = np.empty_like(tiles[TileKey(0)])  # one buffer the "camera" fills again and again
    for key, pixels in tiles.items():
        camera[:] = pixels
        writer.write_frame(camera, {"tile_index": key.index, "channel_index": key.c})
    camera[:] = 0
    gate.gate.set()
    writer.finalize(timeout=30)
    for key, pixels in tiles.items():
        np.testing.assert_array_equal(gate.tiles[key], pixels)


def test_a_failing_backend_is_reported_and_the_others_finish(
    agent: EdgeAgent, tmp_path: Path
) -> None:
    failing = FailingBackend(fail_at=3)
    archive = ArchiveBackend(tmp_path / "archive")
    config = OMEWriterConfig(output_dir=tmp_path)
    writer = OMEWriter(agent, config, {"failing": failing, "archive": archive})
    manifest = writer.start_experiment(scan_spec(SMALL))
    for key, pixels in frames(SMALL, manifest).items():
        writer.write_frame(pixels, {"tile_index": key.index, "channel_index": key.c})
    progress = writer.finalize(timeout=30)
    bad, good = progress.backends["failing"], progress.backends["archive"]
    assert bad.state == "failed"
    assert bad.frames_written == 0 and bad.frames_lost == 12
    assert bad.error is not None and "No space left on device" in bad.error
    assert failing.aborted  # its partial output is given up
    assert good.state == "finished" and good.frames_written == 12
    assert Path(good.location or "").exists()
    # The device status (the retained status topic) carries the same numbers.
    assert agent.status().backends["failing"] == bad


def test_a_backend_without_its_directory_fails_alone(agent: EdgeAgent, tmp_path: Path) -> None:
    writer = OMEWriter(agent, OMEWriterConfig(output_dir=tmp_path, write_zarr=True))
    manifest = writer.start_experiment(scan_spec(SMALL))
    (tmp_path / "ome_zarr").write_text("a file where the backend wants a directory")
    for key, pixels in frames(SMALL, manifest).items():
        writer.write_frame(pixels, {"tile_index": key.index, "channel_index": key.c})
    progress = writer.finalize(timeout=30)
    assert progress.backends["ome_zarr"].state == "failed"
    assert progress.backends["ome_zarr"].frames_lost == 12
    assert progress.backends["ome_tiff"].state == "finished"


def test_a_second_experiment_waits_for_the_first(agent: EdgeAgent, tmp_path: Path) -> None:
    writer = OMEWriter(agent, OMEWriterConfig(output_dir=tmp_path, write_tiff=False))
    writer.start_experiment(scan_spec(SMALL))
    with pytest.raises(PermanentError, match="still acquiring"):
        writer.start_experiment(scan_spec(SMALL, experiment="next"))
    writer.abort()
    assert writer.start_experiment(scan_spec(SMALL, experiment="next")).experiment == "next"


# -- the bandwidth cap ----------------------------------------------------------------------


def test_token_bucket_holds_the_rate_for_any_message_size() -> None:
    now = [0.0]
    bucket = TokenBucket(1000.0, burst=100.0, clock=lambda: now[0])
    assert bucket.reserve(100) == 0  # the burst goes at once
    assert bucket.reserve(4000) == 0  # nothing owed yet: goes, and leaves a debt
    assert bucket.reserve(10) == pytest.approx(4.0)  # the debt is paid off first
    now[0] = 4.0
    assert bucket.reserve(10) == pytest.approx(0.01)
    sent, now[0] = 0, 100.0
    bucket = TokenBucket(1000.0, burst=100.0, clock=lambda: now[0])
    for _ in range(50):  # long run: bytes / elapsed approaches the rate
        now[0] += bucket.reserve(300)
        sent += 300
    assert sent / (now[0] - 100.0) == pytest.approx(1000.0, rel=0.03)


def test_throttle_follows_the_current_limit() -> None:
    owner = type("Owner", (), {})()
    throttle(owner, None, 10**9)  # no limit: never waits
    stop = threading.Event()
    stop.set()  # a stopping publisher is not held up
    throttle(owner, 1.0, 10**6, stop)
    throttle(owner, 1.0, 10**6, stop)


def test_every_published_message_passes_the_limiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[float | None, int]] = []
    monkeypatch.setattr(
        publisher_module, "throttle", lambda _o, rate, n, _s=None: sent.append((rate, n))
    )
    scan = SyntheticScan(columns=2, rows=1, tile_size=256)
    with running_stack(tmp_path, bandwidth_limit_bytes_per_s=50_000_000) as stack:
        writer = OMEWriter(stack.agent, OMEWriterConfig.for_agent(stack.agent, write_tiff=False))
        manifest = writer.start_experiment(scan_spec(scan))
        for key, pixels in frames(scan, manifest).items():
            writer.write_frame(pixels, {"tile_index": key.index})
        writer.finalize()
        done = stack.agent.wait_done([manifest.image_id], 30)
        assert done[manifest.image_id].state == "complete"
    assert {rate for rate, _ in sent} == {50_000_000}
    tile_bytes = sum(n for _, n in sent if n > manifest.tile_bytes)
    assert tile_bytes >= 2 * manifest.tile_bytes  # both tiles (plus headers) were metered


def test_the_client_passes_on_exactly_the_metadata_names_frames_accept() -> None:
    accepted = set()
    for name, field in FrameInfo.model_fields.items():
        accepted.add(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            accepted.update(str(choice) for choice in alias.choices)
    imswitch = {"x": 1.0, "y": 2.0, "z": 3.0, "illuminationChannel": "GFP", "runningNumber": 4,
                "illuminationValue": 10.0, "time_index": 0, "z_index": 0, "channel_index": 0,
                "isRGB": False, "pixel_size": 0.5}  # fmt: skip
    kept = frame_metadata(imswitch)
    assert set(kept) == set(imswitch) - {"isRGB", "pixel_size"}
    assert set(kept) <= accepted
    assert {*FRAME_FIELDS, *IMSWITCH_FIELDS, "tile_index"} <= accepted
    FrameInfo.model_validate(kept)

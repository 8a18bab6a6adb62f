"""The front door in process: local targets (isolation, the memory bound, the ownership
rule), PlaneMeta into the close manifest, partial closes, the abandoned policy, retention,
config validation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.acquisition import Acquisition
from edge_agent.app import EdgeApp
from edge_agent.config import OMEWriterConfig
from edge_agent.confine import ConfinedDir
from edge_agent.errors import ConflictError, UnknownExperimentError
from edge_agent.live import registry_backend
from edge_agent.models import ExperimentSpec, FrameInfo, LocalTarget
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest, decode_close
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage

SCAN = SyntheticScan(columns=3, rows=2, tile_size=32, channels=2)
MANIFEST = SCAN.manifest()


class Recorder(StorageBackend):
    """Records what it got; holds writes while `gate` is clear; fails at the `fail_at`-th."""

    kind = "recorder"

    def __init__(self, name: str, fail_at: int | None = None) -> None:
        super().__init__(name)
        self.gate = threading.Event()
        self.gate.set()
        self.fail_at = fail_at
        self.tiles: dict[TileKey, np.ndarray[Any, Any]] = {}
        self.planes: dict[TileKey, Any] = {}
        self.aborted = False
        self.finished = False

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        backend = self

        class Writer(ImageWriter):
            def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
                backend.gate.wait()
                if backend.fail_at is not None and len(backend.tiles) + 1 == backend.fail_at:
                    raise TransientError("writing: No space left on device")
                self.check_tile(key, pixels)
                backend.tiles[key] = pixels  # a reference: what keeps_references allows

            def finish(self) -> StoredImage:
                self.require_complete(backend.tiles)
                backend.planes = dict(self.planes)
                backend.finished = True
                return StoredImage(backend.name, f"memory:{backend.name}")

            def abort(self) -> None:
                backend.aborted = True
                backend.tiles.clear()

        return Writer(device, manifest, self.name)


@pytest.fixture
def recorders() -> dict[str, Recorder]:
    return {"one": Recorder("one"), "two": Recorder("two")}


@pytest.fixture
def app(tmp_path: Path, recorders: dict[str, Recorder]) -> Iterator[EdgeApp]:
    """An agent that is never started: the spool and the targets work, nothing is sent."""

    def make(target: LocalTarget, folder: ConfinedDir) -> StorageBackend:
        if target.kind == "ome_tiff":
            return registry_backend(target, folder)
        return recorders[target.label]

    settings = AgentSettings(spool_dir=tmp_path / "spool", min_free_bytes=0,
                             local_output_root=tmp_path, fast_path=False)  # fmt: skip
    agent = EdgeApp(settings, make)
    yield agent
    agent.spool.close()


def targets(tmp_path: Path, *labels: str) -> list[dict[str, Any]]:
    return [{"kind": "archive", "name": n, "folder": str(tmp_path / n)} for n in labels]


def start(door: Acquisition, **fields: Any) -> Any:
    return door.start(ExperimentSpec.from_manifest(MANIFEST, server=True, **fields))


def write_all(door: Acquisition, keys: list[TileKey] | None = None) -> None:
    for key in keys or MANIFEST.tile_keys():
        door.write_frame(MANIFEST.image_id, SCAN.frame(key), tile_index=key.index,
                         channel_index=key.c, x_um=1.5, exposure_ms=12.0)  # fmt: skip


def test_a_failing_target_loses_alone(app: EdgeApp, recorders: dict[str, Recorder],
                                      tmp_path: Path) -> None:  # fmt: skip
    recorders["one"].fail_at = 3
    door = app.acquisition
    start(door, targets=targets(tmp_path, "one", "two"))
    write_all(door)
    done = door.finalize(MANIFEST.image_id, timeout=30)
    one, two = done.backends["one"], done.backends["two"]
    assert (one.state, one.frames_written, one.frames_lost) == ("failed", 0, MANIFEST.tile_count)
    assert "No space left" in (one.error or "") and recorders["one"].aborted
    assert (two.state, two.frames_written) == ("finished", MANIFEST.tile_count)
    assert done.state == "finalized" and done.backends["omero"].state == "writing"
    # The server stream is untouched: every frame is queued for it.
    assert app.spool.counts(MANIFEST.image_id).pending == MANIFEST.tile_count
    # The measured metadata reached the target that finished, and the close manifest.
    assert {m.exposure_ms for m in recorders["two"].planes.values()} == {12.0}
    close = decode_close(app.spool.image(MANIFEST.image_id).close or b"")
    assert len(close.planes()) == MANIFEST.tile_count and not close.partial


def test_a_target_that_keeps_references_gets_maps_of_the_spool_not_memory(
    app: EdgeApp, recorders: dict[str, Recorder], tmp_path: Path
) -> None:
    """The archive kind may keep every frame until finish (the ownership rule of
    tilebridge_storage.base): it gets read-only maps of the spool files, which stay until
    it is done, so neither the budget nor memory grows with the image."""
    door = app.acquisition
    start(door, targets=targets(tmp_path, "one"))  # archive: keeps_references
    write_all(door)
    live = door.live.get(MANIFEST.image_id)
    assert live is not None
    assert live.targets is not None
    wait = time.monotonic() + 10
    while len(recorders["one"].tiles) < MANIFEST.tile_count and time.monotonic() < wait:
        time.sleep(0.01)
    kept = recorders["one"].tiles
    assert all(isinstance(p, np.memmap) for p in kept.values())
    assert live.targets.budget.used == 0
    done = door.finalize(MANIFEST.image_id, timeout=30)
    assert done.backends["one"].state == "finished"
    for key, pixels in kept.items():  # still readable until finish: the files stayed
        np.testing.assert_array_equal(pixels, SCAN.frame(key))


def test_write_frame_waits_only_while_the_budget_is_full(
    app: EdgeApp, recorders: dict[str, Recorder], tmp_path: Path
) -> None:
    app.config.update({"max_bytes_in_flight": 1024 * 1024})
    # Two frames' worth of budget: the third waits for the (stuck) target.
    door = app.acquisition
    door.defaults = lambda: OMEWriterConfig(max_bytes_in_flight=1024 * 1024)
    recorders["two"].gate.clear()
    start(door, targets=[{"kind": "ome_zarr", "name": "two", "folder": str(tmp_path / "z")}])
    live = door.live.get(MANIFEST.image_id)
    assert live is not None
    assert live.targets is not None
    live.targets.budget.limit = 2 * MANIFEST.tile_bytes
    keys = MANIFEST.tile_keys()
    write_all(door, keys[:2])
    third = threading.Thread(target=write_all, args=(door, keys[2:3]))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # blocked on the budget, yet already durable in the spool
    assert app.spool.counts(MANIFEST.image_id).accepted == 3
    recorders["two"].gate.set()
    third.join(10)
    assert not third.is_alive()


def test_resume_conflicts_name_the_field_and_repeats_are_answered(app: EdgeApp) -> None:
    door = app.acquisition
    first = start(door, targets=[])
    assert not first.resumed
    again = door.start({"image_id": str(MANIFEST.image_id), **_minimal()})
    assert again.resumed and again.spec == first.spec
    with pytest.raises(ConflictError) as err:
        door.start({"image_id": str(MANIFEST.image_id), **_minimal(), "size_z": 3})
    assert err.value.field == "size_z"
    key = MANIFEST.tile_keys()[0]
    assert door.write_frame(MANIFEST.image_id, SCAN.frame(key), tile_index=0).accepted
    repeat = door.write_frame(MANIFEST.image_id, SCAN.frame(key), tile_index=0)
    assert not repeat.accepted and repeat.reason and repeat.frames_received == 1
    with pytest.raises(ConflictError, match="pixels"):
        door.write_frame(MANIFEST.image_id, SCAN.frame(key) + 1, tile_index=0)
    with pytest.raises(UnknownExperimentError):
        door.experiment(SyntheticScan(seed=99).manifest().image_id)


def _minimal() -> dict[str, Any]:
    positions = [{"x_um": p.x_um, "y_um": p.y_um} for p in MANIFEST.positions]
    return {"experiment": MANIFEST.experiment, "tile_width": 32, "tile_height": 32,
            "pixel_size_um": MANIFEST.pixel_size.x_um, "positions": positions}  # fmt: skip


def test_a_partial_close_lists_the_frames_it_has(app: EdgeApp) -> None:
    door = app.acquisition
    start(door, targets=[])
    keys = MANIFEST.tile_keys()
    write_all(door, keys[:5])
    with pytest.raises(PermanentError, match="7 of 12 frames not written"):
        door.finalize(MANIFEST.image_id)
    done = door.finalize(MANIFEST.image_id, partial=True)
    assert done.state == "finalized" and done.partial
    raw = app.spool.image(MANIFEST.image_id).close or b""
    close = decode_close(raw)
    assert close.partial and close.tile_count == 5
    assert [d.tile for d in close.digests] == keys[:5]
    with pytest.raises(PermanentError, match="no more frames"):
        write_all(door, keys[5:6])
    # A full close never carries the field, so receivers that predate it read it unchanged.
    full = CloseManifest(image_id=close.image_id, tile_count=1, digests=close.digests[:1])
    assert b"partial" not in full.to_bytes()


def test_the_abandoned_policy_and_the_retention(app: EdgeApp, tmp_path: Path) -> None:
    door = app.acquisition
    start(door, targets=[])
    write_all(door, MANIFEST.tile_keys()[:2])
    empty = SyntheticScan(seed=5, columns=1, rows=1, tile_size=32).manifest()
    door.start(ExperimentSpec.from_manifest(empty, server=True, targets=[]))
    assert door.end_abandoned() == []  # not idle long enough
    later = time.time() + app.settings.abandoned.after_s + 1
    assert set(door.end_abandoned(now=later)) == {MANIFEST.image_id, empty.image_id}
    ended = door.experiment(MANIFEST.image_id)
    assert ended.partial and ended.state == "finalized" and "abandoned" in (ended.ended_by or "")
    assert door.experiment(empty.image_id).state == "aborted"  # nothing to keep
    # Answered until its retention is over; forgotten then.
    assert app.spool.purge(retention_s=3600) == 0
    assert app.spool.purge(retention_s=0) == 1  # the aborted one is done; the other sends
    with pytest.raises(UnknownExperimentError):
        door.experiment(empty.image_id)
    assert door.experiment(MANIFEST.image_id).frames_received == 2


def test_a_full_spool_accepts_nothing_and_says_so(app: EdgeApp) -> None:
    door = app.acquisition
    start(door, targets=[])
    app.spool.min_free_bytes = 1 << 62
    with pytest.raises(TransientError, match="spool disk full"):
        write_all(door, MANIFEST.tile_keys()[:1])
    assert "spool disk full" in (app.status().last_error or "")
    assert door.experiment(MANIFEST.image_id).frames_received == 0
    app.spool.min_free_bytes = 0
    write_all(door, MANIFEST.tile_keys()[:1])
    assert app.status().last_error is None


def test_frame_metadata_becomes_the_planes_measured_values(app: EdgeApp) -> None:
    info = FrameInfo.of({"x": 1.0, "y": 2.0, "z": 3.5, "exposure_ms": 5,
                         "timestamp": "2026-11-24T08:00:02+00:00", "tile_index": 0})  # fmt: skip
    meta = info.plane(MANIFEST.acquired_at)
    assert meta is not None and (meta.z_um, meta.delta_t_s) == (3.5, 2.0)
    assert FrameInfo(tile_index=0).plane(MANIFEST.acquired_at) is None


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_bytes_in_flight": 10}, "max_bytes_in_flight"),
        ({"write_tif": True}, "write_tif"),
        ({"compression": "lz4"}, "compression"),
        ({"output_dir": "relative/dir"}, "output_dir"),
        ({"write_tiff": False, "write_omero": False}, "write_omero"),
        ({"layout": "per_tile", "write_zarr": True}, "write_zarr"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        OMEWriterConfig(**values)
    assert field in str(err.value)


def test_spec_targets_are_checked_at_start(app: EdgeApp, tmp_path: Path) -> None:
    door = app.acquisition
    for target, words in [
        ({"kind": "omero", "name": "o", "folder": str(tmp_path)}, "not a local file target"),
        ({"kind": "nope", "folder": str(tmp_path)}, "unknown storage backend"),
        ({"kind": "ome_tiff", "folder": "/etc/tb"}, "local_output_root"),
        ({"kind": "ome_tiff", "folder": str(tmp_path), "options": {"bogus": 1}}, "bogus"),
    ]:
        with pytest.raises(PermanentError, match=words):
            door.start(ExperimentSpec.from_manifest(
                SyntheticScan(seed=len(words)).manifest(), targets=[target],
            ))  # fmt: skip
    assert door.experiments() == []  # nothing was stored for a refused start

"""The front door's two ways to end an image with fewer frames than it planned, with the real
local targets (registry backends, files read back): `not_planned` (a round scan area's empty
grid cells: a complete, sparse image) and `partial` (a stopped scan: incomplete), and the live
target a viewer reads after every frame."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

from edge_agent.app import EdgeApp
from edge_agent.confine import ConfinedDir
from edge_agent.live import registry_backend
from edge_agent.models import ExperimentSpec, LocalTarget
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import decode_close
from tilebridge_storage.base import StorageBackend
from tilebridge_storage.mosaic import assemble

SCAN = SyntheticScan(columns=3, rows=2, tile_size=32, overlap=0.0, channels=1)
MANIFEST = SCAN.manifest()
CORNERS = [0, 2]


class Gate:
    """Holds every write of the backends made through it while closed."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()

    def make(self, target: LocalTarget, folder: ConfinedDir) -> StorageBackend:
        backend = registry_backend(target, folder)
        real_open = backend.open_image
        gate = self.open

        def open_image(device: str, manifest: Any) -> Any:
            writer = real_open(device, manifest)
            real_write = writer.write_tile

            def write_tile(key: TileKey, pixels: Any) -> None:
                gate.wait()
                real_write(key, pixels)

            writer.write_tile = write_tile  # type: ignore[method-assign]
            return writer

        backend.open_image = open_image  # type: ignore[method-assign]
        return backend


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def app(tmp_path: Path, gate: Gate) -> Iterator[EdgeApp]:
    """An agent that is never started: the spool and the local targets work, nothing is
    sent."""
    agent = EdgeApp(settings(tmp_path), gate.make)
    yield agent
    agent.spool.close()


def settings(tmp_path: Path) -> AgentSettings:
    return AgentSettings(spool_dir=tmp_path / "spool", min_free_bytes=0,
                         local_output_root=tmp_path, fast_path=False)  # fmt: skip


def start(app: EdgeApp, tmp_path: Path, live: bool = False) -> None:
    targets = [
        LocalTarget(kind="ome_zarr_v04", folder=tmp_path / "data", live=live),
        LocalTarget(kind="frame_tiffs", folder=tmp_path / "data"),
    ]
    app.acquisition.start(ExperimentSpec.from_manifest(MANIFEST, server=True, targets=targets))


def write(app: EdgeApp, keys: list[TileKey]) -> list[Any]:
    return [
        app.acquisition.write_frame(MANIFEST.image_id, SCAN.frame(k), tile_index=k.index)
        for k in keys
    ]


def canvas(tmp_path: Path) -> np.ndarray[Any, Any]:
    store = tmp_path / "data" / f"{MANIFEST.image_name}.ome.zarr"
    return np.asarray(zarr.open_group(store, mode="r", zarr_format=2)["0"][0, 0, 0])  # type: ignore[index]


def test_a_sparse_image_closes_complete_and_its_targets_finish(
    app: EdgeApp, tmp_path: Path
) -> None:
    start(app, tmp_path)
    held = [k for k in MANIFEST.tile_keys() if k.index not in CORNERS]
    write(app, held)
    with pytest.raises(PermanentError, match="2 of 6 frames not written"):
        app.acquisition.finalize(MANIFEST.image_id)  # holes are not planned unless it says so
    done = app.acquisition.finalize(MANIFEST.image_id, not_planned=CORNERS, timeout=30)
    assert done.state == "finalized" and not done.partial
    assert {n: b.state for n, b in done.backends.items() if n != "omero"} == {
        "ome_zarr_v04": "finished", "frame_tiffs": "finished",
    }  # fmt: skip
    assert done.backends["frame_tiffs"].frames_total == len(held)
    close = decode_close(app.spool.image(MANIFEST.image_id).close or b"")
    assert close.not_planned == (0, 2) and not close.partial and close.tile_count == 4
    expected = assemble(MANIFEST, {k.index: SCAN.frame(k) for k in held})
    np.testing.assert_array_equal(canvas(tmp_path), expected)  # black where never planned
    files = sorted((tmp_path / "data" / MANIFEST.image_name / "tiles").rglob("*.ome.tif"))
    assert sorted(int(f.name.rsplit("_i", 1)[1].split(".")[0]) for f in files) == [1, 3, 4, 5]
    with tifffile.TiffFile(files[0]) as tif:
        assert "tilebridge.not_planned" in (tif.pages[0].description or "")


def test_a_position_with_frames_is_not_taken_as_never_planned(app: EdgeApp, tmp_path: Path) -> None:
    start(app, tmp_path)
    write(app, MANIFEST.tile_keys()[:3])
    with pytest.raises(PermanentError, match="position 0 has frames"):
        app.acquisition.finalize(MANIFEST.image_id, not_planned=[0, 5])
    with pytest.raises(PermanentError, match=r"positions are 0\.\.5"):
        app.acquisition.finalize(MANIFEST.image_id, not_planned=[6])
    assert app.acquisition.experiment(MANIFEST.image_id).state == "acquiring"
    # A round area that was stopped early: sparse and partial at once.
    done = app.acquisition.finalize(MANIFEST.image_id, not_planned=[5], partial=True, timeout=30)
    close = decode_close(app.spool.image(MANIFEST.image_id).close or b"")
    assert close.partial and close.not_planned == (5,) and done.partial
    attrs = zarr.open_group(
        tmp_path / "data" / f"{MANIFEST.image_name}.ome.zarr", mode="r", zarr_format=2
    ).attrs.asdict()
    kv = attrs["tilebridge"]["key_values"]
    assert kv["tilebridge.incomplete"] == "true" and kv["tilebridge.tiles"] == "3/5"
    assert kv["tilebridge.not_planned"] == "5"


def test_a_live_target_has_the_frame_when_write_frame_answers(
    app: EdgeApp, gate: Gate, tmp_path: Path
) -> None:
    start(app, tmp_path, live=True)
    key = MANIFEST.tile_keys()[4]
    gate.open.clear()  # the targets are slow now
    answers: list[Any] = []
    writer = threading.Thread(target=lambda: answers.extend(write(app, [key])))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive() and not answers  # waits for the live target, not for the other
    gate.open.set()
    writer.join(10)
    [answer] = answers
    assert answer.accepted and answer.landed is True
    oy, ox = 32, 32  # position 4: second row, second column
    np.testing.assert_array_equal(canvas(tmp_path)[oy : oy + 32, ox : ox + 32], SCAN.frame(key))
    # Without a live target nothing waits, and the answer says there is none to wait for.
    other = SyntheticScan(seed=9, columns=1, rows=1, tile_size=32).manifest()
    app.acquisition.start(ExperimentSpec.from_manifest(other, server=True, targets=[]))
    plain = app.acquisition.write_frame(other.image_id, np.zeros((32, 32), "<u2"), tile_index=0)
    assert plain.landed is None


def test_after_a_restart_a_sparse_image_being_finished_finishes_the_same(
    tmp_path: Path,
) -> None:
    gate = Gate()
    first = EdgeApp(settings(tmp_path), gate.make)
    start(first, tmp_path)
    held = [k for k in MANIFEST.tile_keys() if k.index not in CORNERS]
    # The targets never get to write before the agent goes (their threads stay held: the
    # agent they belong to is gone, as after a kill).
    gate.open.clear()
    write(first, held)
    progress = first.acquisition.finalize(MANIFEST.image_id, not_planned=CORNERS, timeout=0)
    assert progress.state == "finalizing"
    first.spool.close()
    second = EdgeApp(settings(tmp_path))  # started again: the targets are written anew
    try:
        second.spool.recover()
        second.acquisition.recover()
        deadline = time.monotonic() + 30
        while second.acquisition.experiment(MANIFEST.image_id).state != "finalized":
            assert time.monotonic() < deadline, "the targets did not finish after the restart"
            time.sleep(0.05)
        state = second.acquisition.experiment(MANIFEST.image_id)
        assert state.backends["ome_zarr_v04"].state == "finished"
        expected = assemble(MANIFEST, {k.index: SCAN.frame(k) for k in held})
        np.testing.assert_array_equal(canvas(tmp_path), expected)
    finally:
        second.spool.close()


def test_the_fast_path_carries_not_planned_and_refuses_it_malformed(
    app: EdgeApp, tmp_path: Path
) -> None:
    import json
    import socket as sockets
    import tempfile

    from edge_agent.fastpath_client import HEADER, FastPathClient

    start(app, tmp_path)
    write(app, [k for k in MANIFEST.tile_keys() if k.index not in CORNERS])
    with tempfile.TemporaryDirectory(prefix="tb-") as folder:
        path = Path(folder) / "acquire.sock"
        app.fast_path.serve(path)
        try:
            raw = sockets.socket(sockets.AF_UNIX)
            raw.connect(str(path))
            with raw:  # a hostile client: not_planned that is no list of indices
                body = json.dumps({"op": "finalize", "image_id": str(MANIFEST.image_id),
                                   "not_planned": "0, 2"}).encode()  # fmt: skip
                raw.sendall(HEADER.pack(len(body), 0) + body)
                length, _ = HEADER.unpack(raw.recv(HEADER.size))
                answer = json.loads(raw.recv(length))
            assert not answer["ok"] and "list of position indices" in answer["error"]["message"]
            with FastPathClient(path) as client:
                done = client.finalize(MANIFEST.image_id, not_planned=CORNERS, timeout=30)
            assert done.state == "finalized" and not done.partial
        finally:
            app.fast_path.stop()
    close = decode_close(app.spool.image(MANIFEST.image_id).close or b"")
    assert close.not_planned == (0, 2)

"""Issue 12's causes, each made impossible by construction, each tried for real: a full
ledger disk, a chunk write that fails, a short write, a full disk in the archive write, a
backend whose session dies under it, and a bug on one message. Every time the image arrives
whole, nothing is failed for good, and the ingest keeps answering."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from server_ingest.ledger.sqlite import SqliteLedger
from tests.ingest.harness import Harness, chunks, close_for, tiles_for
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import ErrorAck, ImageState, TileState
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage import archive
from tilebridge_storage.testing.manifests import make_manifest


def wait_until(condition: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)
    return value


def archived(path: str, manifest: Any) -> dict[TileKey, np.ndarray[Any, Any]]:
    shape = (
        manifest.size_t,
        manifest.size_c,
        manifest.size_z,
        manifest.tile_height,
        manifest.tile_width,
    )
    out = {}
    with tifffile.TiffFile(path) as tif:
        for pos, series in zip(manifest.positions, tif.series, strict=True):
            data = series.asarray().reshape(shape)
            for key in manifest.tile_keys():
                if key.index == pos.index:
                    out[key] = data[key.t, key.c, key.z]
    return out


def assert_stored_whole(harness: Harness, manifest: Any, tiles: Any) -> None:
    ack = harness.recorder.wait_image_ack(manifest.image_id, timeout=30)
    assert ack.state is ImageState.COMPLETE, ack
    stored = archived(ack.locations["archive"], manifest)
    for key, pixels in tiles.items():
        np.testing.assert_array_equal(stored[key], pixels)


def test_1_a_full_ledger_disk_delays_acks_and_never_deafens_the_ingest(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    harness = Harness(tmp_path, ledger=ledger)
    try:
        # 300 positions: the open's record needs pages the ledger cannot have.
        manifest = make_manifest(rows=10, columns=30, size_z=1, size_c=1, channels=["DAPI"])
        tiles = tiles_for(manifest)
        # The disk is full: SQLite cannot grow the ledger (SQLITE_FULL) for the open's record.
        pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]
        ledger._db.execute(f"PRAGMA max_page_count = {pages}")
        harness.send(DeviceTopic.OPEN, manifest.to_bytes(), idle=False)
        for key, pixels in tiles.items():
            for message in chunks(manifest, key, pixels):
                harness.send(DeviceTopic.CHUNK, message, idle=False)
        wait_until(lambda: "full" in (harness.stats.last_error or ""))
        # Every tile acknowledged is durable in the ledger; the rest wait for space.
        acked = {a.tile for a in harness.recorder.tile_acks(TileState.COMMITTED)}
        with closing(sqlite3.connect(harness.settings.ledger_path)) as db:
            rows = {TileKey(*r) for r in db.execute("SELECT idx, z, c, t FROM tiles")}
        assert acked <= rows and len(acked) < len(tiles)
        # Still answering everyone: a bad message gets its reason at once.
        harness.send(DeviceTopic.CHUNK, b"garbage", device="scope-2", idle=False)
        wait_until(
            lambda: any(
                d == "scope-2" and isinstance(a, ErrorAck) for d, a in list(harness.recorder.acks)
            )
        )
        assert harness.engine.core._thread.is_alive()
        ledger._db.execute("PRAGMA max_page_count = 1073741823")  # space again
        harness.engine.wait_idle()
        committed = {a.tile for a in harness.recorder.tile_acks(TileState.COMMITTED)}
        assert committed == set(tiles)
        harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
        assert_stored_whole(harness, manifest, tiles)
    finally:
        harness.close()


def test_2_a_single_chunk_tile_whose_write_failed_is_taken_when_resent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(tmp_path)
    try:
        manifest = make_manifest(rows=1, columns=2, size_z=1, size_c=1, channels=["DAPI"])
        tiles = tiles_for(manifest)
        key = manifest.tile_keys()[0]
        (message,) = chunks(manifest, key, tiles[key], size=1 << 20)  # the whole tile
        real = os.pwrite
        failures = [OSError(errno.ENOSPC, "No space left on device")]

        def full_once(fd: int, data: Any, offset: int) -> int:
            if failures:
                raise failures.pop()
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full_once)
        harness.send(DeviceTopic.OPEN, manifest.to_bytes())
        harness.send(DeviceTopic.CHUNK, message)
        assert not harness.recorder.tile_acks(TileState.COMMITTED)
        told = [a for _, a in harness.recorder.acks if isinstance(a, ErrorAck)]
        assert [a.reason for a in told] == [ReasonCode.UNAVAILABLE]
        assert not harness.recorder.tile_acks(TileState.RETRANSMIT)  # no resend storm
        harness.send(DeviceTopic.CHUNK, message)  # the device's resend after its timeout
        assert [a.tile for a in harness.recorder.tile_acks(TileState.COMMITTED)] == [key]
    finally:
        harness.close()


def test_3_a_full_disk_during_the_archive_write_is_retried_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tifffile.TiffWriter.write
    short = [OSError("262144 requested and 196152 written")]  # numpy's short write: no errno

    def write(self: Any, *args: Any, **kwargs: Any) -> Any:
        if short:
            raise short.pop()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(archive.tifffile.TiffWriter, "write", write)
    harness = Harness(tmp_path)
    try:
        manifest = make_manifest()
        tiles = tiles_for(manifest)
        harness.scan(manifest, tiles)
        assert_stored_whole(harness, manifest, tiles)
        assert not short
        delayed = [s for s in harness.recorder.statuses if s.error and "written" in s.error]
        assert delayed and all(s.phase.value == "storing" for s in delayed)
    finally:
        harness.close()


def test_4_a_backend_session_dying_mid_write_is_retried_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a closed shared OMERO session looked like: an AttributeError from inside the
    backend. It was handled as permanent; anything but a PermanentError is now retried."""
    writer = archive._ArchiveWriter
    real = writer.write_tile
    dead = [AttributeError("'NoneType' object has no attribute 'getSession'")]

    def write_tile(self: Any, key: TileKey, pixels: Any) -> None:
        if dead:
            raise dead.pop()
        real(self, key, pixels)

    monkeypatch.setattr(writer, "write_tile", write_tile)
    harness = Harness(tmp_path)
    try:
        manifest = make_manifest()
        tiles = tiles_for(manifest)
        harness.scan(manifest, tiles)
        assert_stored_whole(harness, manifest, tiles)
        assert not dead
        harness.engine.wait_idle()  # the core publishes its snapshot once idle
        assert harness.stats.backends["archive"] == "ok"
    finally:
        harness.close()


def test_6_short_writes_are_continued_not_left_to_the_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    calls = []

    def half(fd: int, data: Any, offset: int) -> int:
        view = memoryview(data)
        calls.append(len(view))
        return real(fd, view[: max(1, len(view) // 2)], offset)

    monkeypatch.setattr(os, "pwrite", half)
    harness = Harness(tmp_path)
    try:
        manifest = make_manifest()
        tiles = tiles_for(manifest)
        harness.scan(manifest, tiles)
        monkeypatch.setattr(os, "pwrite", real)
        assert not harness.recorder.tile_acks(TileState.RETRANSMIT)
        assert_stored_whole(harness, manifest, tiles)
        assert len(calls) > len(tiles)
    finally:
        harness.close()


def test_a_bug_on_one_message_is_answered_dead_lettered_and_the_next_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(tmp_path)
    try:
        manifest = make_manifest()
        tiles = tiles_for(manifest)
        intake = harness.engine.core.intake
        real = intake._close
        monkeypatch.setattr(intake, "_close", lambda *_: 1 / 0)
        harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
        (_, ack) = harness.recorder.acks[-1]
        assert isinstance(ack, ErrorAck) and ack.reason is ReasonCode.INTERNAL_ERROR
        assert "ZeroDivisionError" in ack.detail
        assert harness.stats.rejections["internal_error"] == 1
        monkeypatch.setattr(intake, "_close", real)
        harness.scan(manifest, tiles)
        assert_stored_whole(harness, manifest, tiles)
        letters = SqliteLedger(harness.settings.ledger_path).dead_letters()
        assert [(d.device, d.reason, d.payload_bytes) for d in letters] == [
            ("scope-1", ReasonCode.INTERNAL_ERROR, len(close_for(manifest, tiles).to_bytes()))
        ]
        assert letters[0].payload == close_for(manifest, tiles).to_bytes()
    finally:
        harness.close()


def test_dead_letters_are_listed_for_an_admin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from server_ingest.__main__ import main

    harness = Harness(tmp_path)
    try:
        monkeypatch.setattr(harness.engine.core.intake, "_open", lambda *_: {}["bug"])
        harness.send(DeviceTopic.OPEN, b'{"v": 1}')
    finally:
        harness.close()
    config = tmp_path / "ingest.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path)}))
    assert main(["--config", str(config), "dead-letters", "--json"]) == 0
    (letter,) = json.loads(capsys.readouterr().out)
    assert letter["device"] == "scope-1" and letter["reason"] == "internal_error"
    assert "KeyError" in letter["detail"] and letter["bytes"] == 8
    assert bytes.fromhex(letter["payload_head"]) == b'{"v": 1}'

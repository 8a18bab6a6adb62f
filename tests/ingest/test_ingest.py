"""The ingest's message handling against real staging, ledger and archive (no broker)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from server_ingest.settings import Limits
from tests.ingest.harness import DEVICE, Harness, chunks, close_for, tiles_for
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    ErrorAck,
    ImageState,
    ManifestState,
    OpenAck,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.base import StorageBackend
from tilebridge_storage.testing.manifests import make_manifest


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


def _archive_tiles(path: str, manifest) -> dict[TileKey, np.ndarray]:  # type: ignore[no-untyped-def]
    out = {}
    with tifffile.TiffFile(path) as tif:
        shape = (
            manifest.size_t,
            manifest.size_c,
            manifest.size_z,
            manifest.tile_height,
            manifest.tile_width,
        )
        for pos, series in zip(manifest.positions, tif.series, strict=True):
            data = series.asarray().reshape(shape)
            for t in range(manifest.size_t):
                for c in range(manifest.size_c):
                    for z in range(manifest.size_z):
                        out[TileKey(pos.index, z, c, t)] = data[t, c, z]
    return out


def test_shuffled_duplicated_chunks_of_all_tiles_store_the_image_once(harness: Harness) -> None:
    manifest = make_manifest()
    tiles = tiles_for(manifest)
    messages = [m for k, px in tiles.items() for m in chunks(manifest, k, px)]
    messages += random.Random(0).sample(messages, len(messages) // 3)  # QoS 1 duplicates
    random.Random(1).shuffle(messages)
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())  # close before open
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    for message in messages:
        harness.send(DeviceTopic.CHUNK, message)
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    ack = harness.recorder.wait_image_ack(manifest.image_id)
    assert ack.state is ImageState.COMPLETE
    stored = _archive_tiles(ack.locations["archive"], manifest)
    assert stored.keys() == tiles.keys()
    for key, pixels in tiles.items():
        np.testing.assert_array_equal(stored[key], pixels)
    committed = {a.tile for a in harness.recorder.tile_acks(TileState.COMMITTED)}
    assert committed == set(tiles)
    assert harness.tile_rows(manifest.image_id) == manifest.tile_count
    harness.engine.wait_idle()  # the staged tiles are removed once `complete` is durable
    assert not harness.staging.image_dir(DEVICE, manifest.image_id).exists()


def test_chunks_before_open_ask_for_the_manifest(harness: Harness) -> None:
    manifest = make_manifest()
    key, pixels = next(iter(tiles_for(manifest).items()))
    harness.send(DeviceTopic.CHUNK, chunks(manifest, key, pixels)[0])
    (ack,) = harness.recorder.tile_acks()
    assert (ack.state, ack.reason) == (TileState.RETRANSMIT, ReasonCode.UNKNOWN_IMAGE)


def test_bad_checksum_asks_for_the_tile_again_and_the_resend_commits(harness: Harness) -> None:
    manifest = make_manifest()
    key, pixels = next(iter(tiles_for(manifest).items()))
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    messages = chunks(manifest, key, pixels)
    broken = bytearray(messages[1])
    broken[-3] ^= 0xFF
    harness.send(DeviceTopic.CHUNK, bytes(broken))
    (ack,) = harness.recorder.tile_acks()
    assert (ack.state, ack.reason, ack.tile) == (TileState.RETRANSMIT, ReasonCode.BAD_CHECKSUM, key)
    for message in messages:
        harness.send(DeviceTopic.CHUNK, message)
    assert [a.tile for a in harness.recorder.tile_acks(TileState.COMMITTED)] == [key]


def test_a_resent_committed_tile_is_acked_again_not_stored_twice(tmp_path: Path) -> None:
    manifest = make_manifest()
    key, pixels = next(iter(tiles_for(manifest).items()))
    first = Harness(tmp_path)
    first.send(DeviceTopic.OPEN, manifest.to_bytes())
    for message in chunks(manifest, key, pixels):
        first.send(DeviceTopic.CHUNK, message)
    first.close()
    again = Harness(tmp_path)  # a restarted ingest over the same state
    try:
        for message in chunks(manifest, key, pixels, size=4096):  # even with another chunk size
            again.send(DeviceTopic.CHUNK, message)
        acks = again.recorder.tile_acks()
        assert [(a.tile, a.state) for a in acks] == [(key, TileState.COMMITTED)]
        assert again.tile_rows(manifest.image_id) == 1
    finally:
        again.close()


def test_same_tile_with_other_content_is_a_conflict(harness: Harness) -> None:
    manifest = make_manifest()
    key, pixels = next(iter(tiles_for(manifest).items()))
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    for message in chunks(manifest, key, pixels):
        harness.send(DeviceTopic.CHUNK, message)
    for message in chunks(manifest, key, pixels + 1):
        harness.send(DeviceTopic.CHUNK, message)
    last = harness.recorder.tile_acks()[-1]
    assert (last.state, last.reason) == (TileState.REJECTED, ReasonCode.CONFLICT)


def test_an_image_id_cannot_be_squatted_by_another_device(harness: Harness) -> None:
    """Image ids are the device's own: an intruder opening the id first (with junk) gets an
    image of its own, and the rightful device's image is untouched."""
    manifest = make_manifest()
    tiles = tiles_for(manifest)
    junk = make_manifest(image_id=manifest.image_id, rows=1, columns=1)
    harness.send(DeviceTopic.OPEN, junk.to_bytes(), device="intruder")
    key = next(iter(tiles))
    harness.send(DeviceTopic.CHUNK, chunks(manifest, key, tiles[key] + 1)[0], device="intruder")
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    for k, pixels in tiles.items():
        for message in chunks(manifest, k, pixels):
            harness.send(DeviceTopic.CHUNK, message)
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    ack = harness.recorder.wait_image_ack(manifest.image_id)
    assert ack.state is ImageState.COMPLETE
    stored = _archive_tiles(ack.locations["archive"], manifest)
    for k, pixels in tiles.items():
        np.testing.assert_array_equal(stored[k], pixels)
    mine = [a for d, a in harness.recorder.acks if d == DEVICE]
    assert isinstance(mine[0], OpenAck) and mine[0].state is ManifestState.ACCEPTED
    assert not [a for a in mine if getattr(a, "reason", None) is not None]
    assert harness.tile_rows(manifest.image_id, "intruder") == 0
    assert harness.phase(manifest.image_id, "intruder")[0] == "receiving"


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        (DeviceTopic.CHUNK, b"\x00garbage", ReasonCode.MALFORMED),
        (DeviceTopic.CHUNK, b"TB\x07" + bytes(200), ReasonCode.UNSUPPORTED_VERSION),
        (DeviceTopic.OPEN, b"{not json", ReasonCode.MALFORMED),
        (DeviceTopic.OPEN, json.dumps({"v": 9}).encode(), ReasonCode.UNSUPPORTED_VERSION),
        (
            DeviceTopic.CLOSE,
            json.dumps({"v": 1, "image_id": "x"}).encode(),
            ReasonCode.INVALID_MANIFEST,
        ),
        (DeviceTopic.ACK, b"{}", ReasonCode.MALFORMED),
    ],
)
def test_bad_messages_get_a_reason_code_and_the_ingest_goes_on(
    harness: Harness, kind: DeviceTopic, payload: bytes, reason: ReasonCode
) -> None:
    harness.send(kind, payload)
    device, ack = harness.recorder.acks[-1]
    assert device == DEVICE
    assert isinstance(ack, ErrorAck) and ack.reason is reason
    assert harness.stats.rejections[reason.value] == 1
    test_chunks_before_open_ask_for_the_manifest(harness)  # still answering


def test_unknown_version_open_with_readable_id_is_rejected_by_id(harness: Harness) -> None:
    manifest = make_manifest()
    data = json.loads(manifest.to_bytes())
    data["v"] = 2
    harness.send(DeviceTopic.OPEN, json.dumps(data).encode())
    ((_, ack),) = harness.recorder.acks
    assert isinstance(ack, OpenAck)
    assert (ack.image_id, ack.state, ack.reason) == (
        manifest.image_id,
        ManifestState.REJECTED,
        ReasonCode.UNSUPPORTED_VERSION,
    )


def test_oversize_chunk_and_image_limits(tmp_path: Path) -> None:
    harness = Harness(tmp_path, Limits(max_chunk_bytes=4096, max_tiles_per_image=10))
    try:
        small = make_manifest(rows=1, columns=2)
        harness.send(DeviceTopic.OPEN, small.to_bytes())
        key, pixels = next(iter(tiles_for(small).items()))
        harness.send(DeviceTopic.CHUNK, chunks(small, key, pixels, size=8192)[0])
        big = make_manifest()  # 24 tiles > 10
        harness.send(DeviceTopic.OPEN, big.to_bytes())
        acks = [a for _, a in harness.recorder.acks]
        assert acks[0].state is ManifestState.ACCEPTED  # type: ignore[union-attr]
        assert (acks[1].state, acks[1].reason) == (TileState.REJECTED, ReasonCode.OVERSIZE)  # type: ignore[union-attr]
        assert (acks[2].state, acks[2].reason) == (
            ManifestState.REJECTED,
            ReasonCode.QUOTA_EXCEEDED,
        )  # type: ignore[union-attr]
    finally:
        harness.close()


class Unreachable(StorageBackend):
    kind = "archive"

    def open_image(self, device: str, manifest: object) -> Any:
        raise TransientError("the archive volume is not mounted")


def test_restart_while_storing_finishes_the_image(tmp_path: Path) -> None:
    manifest = make_manifest()
    tiles = tiles_for(manifest)
    first = Harness(tmp_path, backends=[Unreachable()])  # nothing gets stored
    first.send(DeviceTopic.OPEN, manifest.to_bytes())
    for key, pixels in tiles.items():
        for message in chunks(manifest, key, pixels):
            first.send(DeviceTopic.CHUNK, message)
    first.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    first.close()
    assert first.phase(manifest.image_id)[0] == "storing"
    second = Harness(tmp_path)  # restarted: it resumes storing what was staged
    try:
        ack = second.recorder.wait_image_ack(manifest.image_id)
        assert ack.state is ImageState.COMPLETE
        stored = _archive_tiles(ack.locations["archive"], manifest)
        for key, pixels in tiles.items():
            np.testing.assert_array_equal(stored[key], pixels)
    finally:
        second.close()


class Refusing(StorageBackend):
    kind = "refusing"

    def open_image(self, device: str, manifest: object) -> Any:
        raise PermanentError("no room for this image anywhere")


def test_a_failed_image_still_counts_against_the_quota_after_a_restart(tmp_path: Path) -> None:
    manifest = make_manifest(rows=1, columns=2)
    tiles = tiles_for(manifest)
    limits = Limits(max_staged_bytes_per_device=manifest.tile_count * manifest.tile_bytes)
    first = Harness(tmp_path, limits, backends=[Refusing()])
    first.send(DeviceTopic.OPEN, manifest.to_bytes())
    for key, pixels in tiles.items():
        for message in chunks(manifest, key, pixels):
            first.send(DeviceTopic.CHUNK, message)
    first.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    assert first.recorder.wait_image_ack(manifest.image_id).state is ImageState.FAILED
    first.close()
    second = Harness(tmp_path, limits)  # restarted: the failed image's tiles are still staged
    try:
        other = make_manifest(rows=1, columns=1)
        second.send(DeviceTopic.OPEN, other.to_bytes())
        key, pixels = next(iter(tiles_for(other).items()))
        second.send(DeviceTopic.CHUNK, chunks(other, key, pixels)[0])
        _, refusal = second.recorder.acks[-1]
        assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.QUOTA_EXCEEDED
    finally:
        second.close()


def test_measured_plane_metadata_reaches_the_backends(tmp_path: Path) -> None:
    from tilebridge_protocol.messages import CloseManifest, PlaneMeta, TileDigest
    from tilebridge_storage.archive import ArchiveBackend

    seen: dict[TileKey, PlaneMeta] = {}

    class Recording(ArchiveBackend):
        def open_image(self, device: str, manifest: Any) -> Any:
            writer = super().open_image(device, manifest)
            finish = writer.finish

            def finish_and_record() -> Any:
                seen.update(writer.planes)
                return finish()

            writer.finish = finish_and_record  # type: ignore[method-assign]
            return writer

    harness = Harness(tmp_path, backends=[Recording(tmp_path / "archive")])
    try:
        manifest = make_manifest()
        tiles = tiles_for(manifest)
        close = close_for(manifest, tiles)
        measured = PlaneMeta(x_um=1.5, y_um=-2.0, exposure_ms=12.0)
        close = CloseManifest(
            image_id=close.image_id,
            tile_count=close.tile_count,
            digests=tuple(
                TileDigest(tile=d.tile, digest=d.digest, meta=measured) for d in close.digests
            ),
        )
        harness.send(DeviceTopic.OPEN, manifest.to_bytes())
        for key, pixels in tiles.items():
            for message in chunks(manifest, key, pixels):
                harness.send(DeviceTopic.CHUNK, message)
        harness.send(DeviceTopic.CLOSE, close.to_bytes())
        assert harness.recorder.wait_image_ack(manifest.image_id).state is ImageState.COMPLETE
        assert seen == dict.fromkeys(manifest.tile_keys(), measured)
    finally:
        harness.close()

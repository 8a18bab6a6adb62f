"""Per-device limits: each refused before the work it bounds, with its reason code on the
device's ack topic, counted, and without touching another device."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from server_ingest.events import Inbound
from server_ingest.settings import Limits
from tests.ingest.harness import DEVICE, Harness, chunks, close_for, tiles_for
from tilebridge_protocol.framing import ChunkHeader, encode_chunk, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    ErrorAck,
    ImageState,
    ManifestState,
    OpenAck,
    TileAck,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_storage.testing.manifests import make_manifest

SMALL = {"size_z": 1, "size_c": 1, "channels": ["DAPI"]}


def answers(harness: Harness, device: str = DEVICE) -> list[Any]:
    return [a for d, a in list(harness.recorder.acks) if d == device]


def test_open_images_per_device(tmp_path: Path) -> None:
    harness = Harness(tmp_path, Limits(max_open_images_per_device=2))
    try:
        first, second, third = (make_manifest(rows=1, columns=1, **SMALL) for _ in range(3))
        for m in (first, second, third):
            harness.send(DeviceTopic.OPEN, m.to_bytes())
        acks = answers(harness)
        assert [type(a).__name__ for a in acks] == ["OpenAck", "OpenAck", "ErrorAck"]
        assert acks[2].reason is ReasonCode.QUOTA_EXCEEDED and acks[2].image_id == third.image_id
        harness.send(DeviceTopic.OPEN, third.to_bytes(), device="scope-2")  # its own limit
        assert answers(harness, "scope-2")[0].state is ManifestState.ACCEPTED
        tiles = tiles_for(first)
        harness.scan(first, tiles)  # first completes: a slot frees up
        harness.recorder.wait_image_ack(first.image_id)
        harness.send(DeviceTopic.OPEN, third.to_bytes())
        assert answers(harness)[-1] == OpenAck(image_id=third.image_id, state="accepted")
        assert harness.stats.rejections["quota_exceeded"] == 1
    finally:
        harness.close()


def test_declared_bytes_and_manifest_memory_per_device(tmp_path: Path) -> None:
    m = make_manifest(rows=1, columns=2, **SMALL)
    size = m.tile_count * m.tile_bytes
    limits = Limits(max_declared_bytes_per_device=size + 1, max_manifest_bytes_per_device=4 << 20)
    harness = Harness(tmp_path, limits)
    try:
        harness.send(DeviceTopic.OPEN, m.to_bytes())
        other = make_manifest(rows=1, columns=2, **SMALL)
        harness.send(DeviceTopic.OPEN, other.to_bytes())
        refusal = answers(harness)[-1]
        assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.QUOTA_EXCEEDED
        assert "declared" in refusal.detail
        huge = b"{" + b" " * (4 << 20) + b"}"  # refused by its size, before it is parsed
        harness.send(DeviceTopic.OPEN, huge)
        refusal = answers(harness)[-1]
        assert isinstance(refusal, ErrorAck) and "manifests" in refusal.detail
    finally:
        harness.close()


def _chunk(m: Any, index: int, count: int, offset: int, length: int, data: bytes = b"") -> bytes:
    header = ChunkHeader(
        m.image_id,
        TileKey(0),
        index,
        count,
        offset,
        m.tile_bytes,
        length,
        tile_digest(bytes(m.tile_bytes)),
    )
    return encode_chunk(header, data or bytes(length))


def test_chunks_per_tile_and_empty_chunks_are_refused_before_placing(tmp_path: Path) -> None:
    harness = Harness(tmp_path, Limits(max_chunks_per_tile=16))
    try:
        m = make_manifest(rows=1, columns=1, **SMALL)
        harness.send(DeviceTopic.OPEN, m.to_bytes())
        harness.send(DeviceTopic.CHUNK, _chunk(m, 0, 17, 0, 8))
        harness.send(DeviceTopic.CHUNK, _chunk(m, 0, 4, 0, 0))  # zero-length
        harness.send(DeviceTopic.CHUNK, _chunk(m, 0, m.tile_bytes + 1, 0, 1))
        acks = [a for a in answers(harness) if isinstance(a, TileAck)]
        assert [(a.state, a.reason) for a in acks] == [
            (TileState.REJECTED, ReasonCode.QUOTA_EXCEEDED),
            (TileState.REJECTED, ReasonCode.OUT_OF_RANGE),
            (TileState.REJECTED, ReasonCode.QUOTA_EXCEEDED),  # more chunks than bytes, too
        ]
        assert not harness.engine.core.state.images[
            next(iter(harness.engine.core.state.images))
        ].assemblies
    finally:
        harness.close()


def test_partial_tiles_per_device(tmp_path: Path) -> None:
    harness = Harness(tmp_path, Limits(max_partial_tiles_per_device=2))
    try:
        m = make_manifest(rows=1, columns=3, **SMALL)
        tiles = tiles_for(m)
        harness.send(DeviceTopic.OPEN, m.to_bytes())
        firsts = [chunks(m, k, px)[0] for k, px in tiles.items()]  # first chunk of each tile
        for message in firsts:
            harness.send(DeviceTopic.CHUNK, message)
        refusal = answers(harness)[-1]
        assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.QUOTA_EXCEEDED
        assert "reassembly" in refusal.detail
        harness.scan(m, tiles)  # the device's resends, tile by tile, all get in
        assert harness.recorder.wait_image_ack(m.image_id).state is ImageState.COMPLETE
    finally:
        harness.close()


def test_message_rate_per_device(tmp_path: Path) -> None:
    harness = Harness(tmp_path, Limits(message_rate_per_device=5, message_burst_per_device=10))
    try:
        for _ in range(40):
            harness.engine.handle(Inbound(device_topic(DEVICE, DeviceTopic.CHUNK), b"x"))
        harness.send(DeviceTopic.CHUNK, b"y", device="scope-2")
        refused = harness.stats.rejections["rate_limited"]
        assert 20 <= refused <= 30
        told = [a for a in answers(harness) if a.reason is ReasonCode.RATE_LIMITED]
        assert 1 <= len(told) <= 2  # a flood is told once a second, not once a message
        assert [a.reason for a in answers(harness, "scope-2")] == [ReasonCode.MALFORMED]
    finally:
        harness.close()


def test_a_never_closed_image_expires_and_is_revived_by_its_open(tmp_path: Path) -> None:
    # A TTL no real pause of a loaded machine reaches; the test skips the time instead.
    harness = Harness(tmp_path, Limits(image_ttl_s=20, max_open_images_per_device=1))
    try:
        m = make_manifest(rows=1, columns=2, **SMALL)
        tiles = tiles_for(m)
        harness.send(DeviceTopic.OPEN, m.to_bytes())
        first = m.tile_keys()[0]
        for message in chunks(m, first, tiles[first]):
            harness.send(DeviceTopic.CHUNK, message)
        harness.clock.advance(21)
        deadline = time.monotonic() + 20
        while harness.phase(m.image_id)[0] != "expired":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = make_manifest(rows=1, columns=1, **SMALL)  # the slot is free again
        harness.send(DeviceTopic.OPEN, other.to_bytes())
        assert answers(harness)[-1].state is ManifestState.ACCEPTED
        harness.scan(other, tiles_for(other))
        harness.recorder.wait_image_ack(other.image_id)
        harness.engine.wait_idle()
        assert harness.staging.image_dir(DEVICE, m.image_id).exists()  # its tile is kept
        harness.send(DeviceTopic.OPEN, m.to_bytes())  # the device is back: open, the rest
        for key in m.tile_keys()[1:]:
            for message in chunks(m, key, tiles[key]):
                harness.send(DeviceTopic.CHUNK, message)
        harness.send(DeviceTopic.CLOSE, close_for(m, tiles).to_bytes())
        assert harness.recorder.wait_image_ack(m.image_id).state is ImageState.COMPLETE
        assert harness.tile_rows(m.image_id) == m.tile_count
    finally:
        harness.close()


def test_retained_device_messages_are_refused_unread(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    try:
        m = make_manifest(**SMALL)
        harness.engine.handle(Inbound(device_topic(DEVICE, DeviceTopic.OPEN), m.to_bytes(), True))
        harness.engine.wait_idle()
        (refusal,) = answers(harness)
        assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.MALFORMED
        assert "retained" in refusal.detail
        harness.scan(m, tiles_for(m))
        assert harness.recorder.wait_image_ack(m.image_id).state is ImageState.COMPLETE
        assert close_for(m, tiles_for(m)).tile_count == m.tile_count
    finally:
        harness.close()

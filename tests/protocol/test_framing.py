from __future__ import annotations

import random
from uuid import uuid4

import numpy as np
import pytest

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.framing import (
    HEADER_SIZE,
    Codec,
    chunk_geometry,
    decode_chunk,
    encode_tile,
    peek_identity,
    tile_digest,
)
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.reasons import ReasonCode


def _tile(nbytes: int = 300_000) -> bytes:
    return np.random.default_rng(1).integers(0, 4000, nbytes // 2, dtype=np.uint16).tobytes()


@pytest.mark.parametrize("codec", [Codec.RAW, Codec.ZSTD])
def test_chunks_in_any_order_rebuild_the_tile(codec: Codec) -> None:
    data, image_id, key = _tile(), uuid4(), TileKey(3, 1, 0, 2)
    messages = list(encode_tile(image_id, key, data, chunk_size=64 * 1024, codec=codec))
    assert len(messages) == 5
    random.Random(3).shuffle(messages)
    rebuilt = bytearray(len(data))
    for message in messages:
        header, raw = decode_chunk(message)
        assert (header.image_id, header.tile, header.chunk_count) == (image_id, key, 5)
        assert header.tile_digest == tile_digest(data)
        rebuilt[header.offset : header.offset + header.raw_length] = raw
    assert bytes(rebuilt) == data


def test_zstd_shrinks_structured_pixels() -> None:
    data = np.tile(np.arange(1024, dtype=np.uint16), 256).tobytes()
    raw = sum(map(len, encode_tile(uuid4(), TileKey(0), data, 1 << 20, Codec.RAW)))
    packed = sum(map(len, encode_tile(uuid4(), TileKey(0), data, 1 << 20, Codec.ZSTD)))
    assert packed < raw / 4


def test_a_flipped_payload_bit_is_a_bad_checksum() -> None:
    message = bytearray(next(encode_tile(uuid4(), TileKey(0), _tile(), 1 << 20)))
    message[HEADER_SIZE + 100] ^= 0x01
    with pytest.raises(ProtocolError) as err:
        decode_chunk(bytes(message))
    assert err.value.reason is ReasonCode.BAD_CHECKSUM


def test_a_flipped_header_bit_is_a_bad_checksum_but_identity_is_peekable() -> None:
    image_id = uuid4()
    message = bytearray(next(encode_tile(image_id, TileKey(7), _tile(), 1 << 20)))
    message[40] ^= 0x10  # inside the offset field
    with pytest.raises(ProtocolError) as err:
        decode_chunk(bytes(message))
    assert err.value.reason is ReasonCode.BAD_CHECKSUM
    assert peek_identity(bytes(message)) == (image_id, TileKey(7))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: b"XX" + m[2:], ReasonCode.MALFORMED),
        (lambda m: m[:2] + bytes([2]) + m[3:], ReasonCode.UNSUPPORTED_VERSION),
        (lambda m: m[:50], ReasonCode.MALFORMED),
        (lambda m: m[:-1], ReasonCode.MALFORMED),
        (lambda m: b"", ReasonCode.MALFORMED),
    ],
)
def test_broken_messages_are_refused_with_a_reason(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    message = next(encode_tile(uuid4(), TileKey(0), _tile(), 1 << 20))
    with pytest.raises(ProtocolError) as err:
        decode_chunk(mutate(message))
    assert err.value.reason is reason


def test_oversize_chunks_are_refused() -> None:
    message = next(encode_tile(uuid4(), TileKey(0), _tile(600_000), 1 << 20))
    with pytest.raises(ProtocolError) as err:
        decode_chunk(message, max_chunk_bytes=256 * 1024)
    assert err.value.reason is ReasonCode.OVERSIZE


def test_chunk_geometry_covers_the_tile_exactly() -> None:
    assert chunk_geometry(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert chunk_geometry(8, 4) == [(0, 4), (4, 4)]
    assert chunk_geometry(0, 4) == [(0, 0)]
    with pytest.raises(ValueError):
        chunk_geometry(10, 0)


def _zstd_chunk(payload: bytes, raw_length: int, tile_bytes: int | None = None) -> bytes:
    """A correctly checksummed chunk that carries `payload` as its zstd data."""
    from tilebridge_protocol.framing import ChunkHeader, encode_chunk

    header = ChunkHeader(
        uuid4(), TileKey(0), 0, 1, 0, tile_bytes or raw_length, raw_length, bytes(16), Codec.ZSTD
    )
    return encode_chunk(header, payload)


def _frame_declaring(content_size: int) -> bytes:
    """A 17-byte zstd frame whose header claims `content_size` bytes (one RLE block)."""
    import struct

    descriptor = 0xE0  # 8-byte content size field, single segment, no checksum, no dictionary
    block = 1 | (1 << 1) | ((128 * 1024) << 3)  # last block, RLE, 128 KiB
    return (
        b"\x28\xb5\x2f\xfd"
        + bytes([descriptor])
        + struct.pack("<Q", content_size)
        + block.to_bytes(3, "little")
        + b"\x00"
    )


def test_a_frame_declaring_a_huge_size_is_refused_before_any_allocation() -> None:
    # The poison chunk of issue 11: python-zstandard would allocate the declared 1 TiB.
    message = _zstd_chunk(_frame_declaring(1 << 40), raw_length=1024)
    assert len(message) < 200
    with pytest.raises(ProtocolError) as err:
        decode_chunk(message)
    assert err.value.reason is ReasonCode.MALFORMED
    assert "declares 1099511627776 bytes" in err.value.detail


def test_a_decompression_bomb_is_cut_off_at_the_header_length() -> None:
    import zstandard

    # 64 MiB of zeros without a declared size, in a chunk whose header says 64 KiB.
    stream = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = b"".join(stream.compress(bytes(1 << 20)) for _ in range(64)) + stream.flush()
    assert len(bomb) < 64 * 1024
    with pytest.raises(ProtocolError) as err:
        decode_chunk(_zstd_chunk(bomb, raw_length=64 * 1024, tile_bytes=1 << 26))
    assert err.value.reason is ReasonCode.MALFORMED
    assert "length differs" in err.value.detail


@pytest.mark.parametrize("payload", [b"", b"\x28\xb5\x2f\xfd", b"not zstd at all", bytes(64)])
def test_garbage_zstd_payloads_are_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_chunk(_zstd_chunk(payload, raw_length=1000))
    assert err.value.reason is ReasonCode.MALFORMED

"""Binary tile chunks: a fixed header followed by the payload.

A tile (one camera frame, raw little-endian C-order pixels) is cut into chunks of at most
`chunk_size` raw bytes. Each chunk says where its bytes go (`offset` into the raw tile), how
many chunks make the tile and the digest of the whole tile, so the receiver can place chunks
arriving in any order, twice, or after a restart, and verify the tile without any other
message. Header layout (network byte order, 96 bytes):

    magic        2s  b"TB"
    version      B   1
    codec        B   0 = raw, 1 = zstd (each chunk compressed on its own)
    image_id     16s UUID bytes
    tile index   I   stage position index
    z, c, t      H H I
    chunk_index  I
    chunk_count  I
    offset       Q   byte offset of this chunk in the raw tile
    tile_bytes   Q   raw size of the whole tile
    raw_length   I   raw size of this chunk (after decoding the payload)
    payload_len  I   bytes following the header
    tile_digest  16s xxh3_128 of the whole raw tile
    checksum     Q   xxh3_64 over the header before this field and the payload

The version byte sits at a fixed place so any future header can be recognised and refused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from uuid import UUID

import xxhash
import zstandard

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import PROTOCOL_VERSION
from tilebridge_protocol.reasons import ReasonCode

MAGIC = b"TB"
HEADER = struct.Struct("!2sBB16sIHHIIIQQII16sQ")
HEADER_SIZE = HEADER.size
_CHECKED = HEADER_SIZE - 8
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    image_id: UUID
    tile: TileKey
    chunk_index: int
    chunk_count: int
    offset: int
    tile_bytes: int
    raw_length: int
    tile_digest: bytes
    codec: Codec = Codec.RAW


def tile_digest(data: bytes | memoryview) -> bytes:
    """The whole-tile digest: xxh3_128 of the raw bytes (16 bytes)."""
    return xxhash.xxh3_128_digest(data)


def chunk_geometry(tile_bytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of a tile; at least one chunk, even for an empty tile."""
    if chunk_size <= 0 or chunk_size > MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
    if tile_bytes == 0:
        return [(0, 0)]
    return [(o, min(chunk_size, tile_bytes - o)) for o in range(0, tile_bytes, chunk_size)]


def encode_chunk(header: ChunkHeader, payload: bytes | memoryview) -> bytes:
    t = header.tile
    head = HEADER.pack(
        MAGIC, PROTOCOL_VERSION, int(header.codec), header.image_id.bytes,
        t.index, t.z, t.c, t.t,
        header.chunk_index, header.chunk_count, header.offset, header.tile_bytes,
        header.raw_length, len(payload), header.tile_digest, 0,
    )  # fmt: skip
    hasher = xxhash.xxh3_64(head[:_CHECKED])
    hasher.update(payload)
    return head[:_CHECKED] + hasher.digest() + bytes(payload)


def encode_tile(
    image_id: UUID,
    key: TileKey,
    data: bytes | memoryview,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    codec: Codec = Codec.RAW,
    digest: bytes | None = None,
) -> Iterator[bytes]:
    """Yield the wire messages of one tile, lazily, so only one chunk is in memory at a time."""
    view = memoryview(data).cast("B")
    digest = digest if digest is not None else tile_digest(view)
    geometry = chunk_geometry(len(view), chunk_size)
    compressor = zstandard.ZstdCompressor(level=1) if codec is Codec.ZSTD else None
    for index, (offset, length) in enumerate(geometry):
        raw = view[offset : offset + length]
        payload: bytes | memoryview = compressor.compress(raw) if compressor else raw
        header = ChunkHeader(
            image_id, key, index, len(geometry), offset, len(view), length, digest, codec
        )
        yield encode_chunk(header, payload)


def decode_chunk(
    message: bytes, max_chunk_bytes: int = MAX_CHUNK_SIZE
) -> tuple[ChunkHeader, bytes]:
    """Parse and verify one chunk message; return its header and the *raw* (decoded) bytes.

    Raises ProtocolError with the reason to send back: malformed, unsupported_version,
    oversize or bad_checksum.
    """
    if len(message) < 3 or message[:2] != MAGIC:
        raise ProtocolError(ReasonCode.MALFORMED, "not a tilebridge chunk (bad magic)")
    if message[2] != PROTOCOL_VERSION:
        raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION, f"chunk version {message[2]}")
    if len(message) < HEADER_SIZE:
        raise ProtocolError(ReasonCode.MALFORMED, f"truncated header ({len(message)} bytes)")
    (_, _, codec, image_bytes, index, z, c, t, chunk_index, chunk_count, offset, tile_bytes,
     raw_length, payload_len, digest, checksum) = HEADER.unpack_from(message)  # fmt: skip
    if raw_length > max_chunk_bytes or payload_len > max_chunk_bytes:
        raise ProtocolError(ReasonCode.OVERSIZE, f"chunk of {max(raw_length, payload_len)} bytes")
    payload = memoryview(message)[HEADER_SIZE:]
    if len(payload) != payload_len:
        raise ProtocolError(
            ReasonCode.MALFORMED, f"payload is {len(payload)} bytes, header says {payload_len}"
        )
    hasher = xxhash.xxh3_64(memoryview(message)[:_CHECKED])
    hasher.update(payload)
    if hasher.intdigest() != checksum:
        # The header itself may be corrupt, so the image id is only a hint to the receiver.
        raise ProtocolError(ReasonCode.BAD_CHECKSUM, "chunk checksum mismatch")
    try:
        codec = Codec(codec)
    except ValueError:
        raise ProtocolError(ReasonCode.MALFORMED, f"unknown codec {codec}") from None
    if chunk_count == 0 or chunk_index >= chunk_count or offset + raw_length > tile_bytes:
        raise ProtocolError(ReasonCode.OUT_OF_RANGE, "chunk lies outside its tile")
    raw = _decode_payload(codec, payload, raw_length)
    header = ChunkHeader(
        UUID(bytes=image_bytes), TileKey(index, z, c, t), chunk_index, chunk_count,
        offset, tile_bytes, raw_length, digest, codec,
    )  # fmt: skip
    return header, raw


def peek_identity(message: bytes) -> tuple[UUID, TileKey] | None:
    """Best-effort image id and tile of a chunk that failed verification (for a retransmit ack)."""
    if len(message) < HEADER_SIZE or message[:2] != MAGIC or message[2] != PROTOCOL_VERSION:
        return None
    fields = HEADER.unpack_from(message)
    return UUID(bytes=fields[3]), TileKey(fields[4], fields[5], fields[6], fields[7])


def _decode_payload(codec: Codec, payload: memoryview, raw_length: int) -> bytes:
    """The raw bytes of a payload, never allocating more than `raw_length` (+1 to detect a
    longer stream): the header is the only thing that sizes a buffer, whatever a zstd frame
    claims about itself."""
    if codec is Codec.RAW:
        if len(payload) != raw_length:
            raise ProtocolError(ReasonCode.MALFORMED, "raw payload length differs from header")
        return bytes(payload)
    try:
        # python-zstandard sizes its output by the frame's declared content size and ignores
        # `max_output_size` when one is declared (a 17-byte frame can ask for 1 TiB): check the
        # declaration against the header first, then decode as a stream with a hard cap.
        declared = zstandard.get_frame_parameters(payload).content_size
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, raw_length):
            raise ProtocolError(
                ReasonCode.MALFORMED,
                f"zstd frame declares {declared} bytes, header says {raw_length}",
            )
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
        with reader:
            raw = _read_capped(reader, raw_length + 1)
    except ProtocolError:
        raise
    except (zstandard.ZstdError, ValueError, OverflowError, MemoryError) as exc:
        raise ProtocolError(ReasonCode.MALFORMED, f"zstd payload: {exc}") from None
    if len(raw) != raw_length:
        raise ProtocolError(ReasonCode.MALFORMED, "decoded payload length differs from header")
    return raw


def _read_capped(reader: zstandard.ZstdDecompressionReader, cap: int) -> bytes:
    out = bytearray()
    while len(out) < cap:
        block = reader.read(cap - len(out))
        if not block:
            break
        out += block
    return bytes(out)

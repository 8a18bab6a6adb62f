"""zstd-compressed JSON messages: how a close manifest too big for plain JSON still fits.

A close manifest lists every tile's digest and, since `PlaneMeta`, what was measured when it
was taken: about 200 bytes of JSON a tile, so plain JSON passes `MAX_JSON_BYTES` near 20k
tiles. Such a message is sent as one zstd frame instead (level 3: about 67 bytes a tile, the
digests being random hex; about 60k tiles fit), with zstd's content checksum. A receiver
tells the two apart by the first bytes (a zstd frame starts with its magic number, JSON with
`{`) and decodes with a hard cap, so a small frame can never make it allocate more than
`MAX_DECODED_JSON_BYTES`.
"""

from __future__ import annotations

import zstandard

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.reasons import ReasonCode

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESS_ABOVE = 256 * 1024
"""JSON longer than this is compressed; shorter stays readable on the wire (mosquitto_sub)."""
MAX_DECODED_JSON_BYTES = 64 * 1024 * 1024
"""The most a compressed JSON message may expand to."""


def maybe_compress(raw: bytes) -> bytes:
    if len(raw) <= COMPRESS_ABOVE:
        return raw
    # The frame's own checksum: a flipped byte in random hex digests can decode to other,
    # equally valid hex, which only the checksum tells apart.
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True)
    return compressor.compress(raw)


def is_compressed(payload: bytes) -> bool:
    return payload[:4] == ZSTD_MAGIC


def decompress(payload: bytes) -> bytes:
    """The JSON inside a zstd frame, never more than MAX_DECODED_JSON_BYTES of it."""
    cap = MAX_DECODED_JSON_BYTES
    try:
        # The declared size is checked first: python-zstandard would allocate it up front.
        declared = zstandard.get_frame_parameters(payload).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > cap:
            raise ProtocolError(ReasonCode.OVERSIZE, f"compressed JSON declares {declared} bytes")
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_across_frames=False)
        out = bytearray()
        with reader:
            while len(out) <= cap:
                block = reader.read(cap + 1 - len(out))
                if not block:
                    break
                out += block
    except ProtocolError:
        raise
    except (zstandard.ZstdError, ValueError, OverflowError, MemoryError) as exc:
        raise ProtocolError(ReasonCode.MALFORMED, f"compressed JSON: {exc}") from None
    if len(out) > cap:
        raise ProtocolError(ReasonCode.OVERSIZE, f"compressed JSON expands past {cap} bytes")
    return bytes(out)

"""The optional open fields (channel colours, time interval, time point, well) and zstd-
compressed JSON for close manifests too big for plain JSON."""

from __future__ import annotations

import json
import os
from uuid import uuid4

import pytest
import zstandard

from tilebridge_protocol.compressed import COMPRESS_ABOVE, MAX_DECODED_JSON_BYTES
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    MAX_JSON_BYTES,
    OPTIONAL_OPEN_FIELDS,
    CloseManifest,
    PlaneMeta,
    TileDigest,
    Well,
    decode_close,
    decode_open,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage.testing.manifests import make_manifest


def test_unset_optional_fields_stay_off_the_wire() -> None:
    plain = json.loads(make_manifest().to_bytes())
    assert not set(OPTIONAL_OPEN_FIELDS) & set(plain)


def test_optional_fields_round_trip() -> None:
    manifest = make_manifest(
        channel_colors=("0000FF", "00FF00"),
        time_interval_s=30.0,
        first_time_point=2,
        well=Well(plate="corning-96", row="B", column=7, condition="drug A"),
    )
    again = decode_open(manifest.to_bytes())
    assert again == manifest
    assert again.channel_color(1) == "00FF00"
    assert again.time_offset_s == 60.0
    assert again.well is not None and again.well.name == "B7"


@pytest.mark.parametrize(
    "field,value",
    [
        ("channel_colors", ["0000FF"]),  # one colour for two channels
        ("channel_colors", ["blue", "green"]),
        ("time_interval_s", 0),
        ("first_time_point", -1),
        ("well", {"plate": "p", "row": "b", "column": 1}),
        ("well", {"plate": "p", "row": "B", "column": 0}),
    ],
)
def test_bad_optional_fields_are_refused(field: str, value: object) -> None:
    data = json.loads(make_manifest().to_bytes())
    data[field] = value
    with pytest.raises(ProtocolError) as refused:
        decode_open(json.dumps(data).encode())
    assert refused.value.reason is ReasonCode.INVALID_MANIFEST
    assert field in str(refused.value)


def _big_close(tiles: int) -> CloseManifest:
    meta = PlaneMeta(x_um=1234.5, y_um=-987.25, z_um=12.0, exposure_ms=20.0, delta_t_s=3.5)
    return CloseManifest(
        image_id=uuid4(),
        tile_count=tiles,
        digests=tuple(
            TileDigest(tile=TileKey(i), digest=os.urandom(16).hex(), meta=meta)
            for i in range(tiles)
        ),
    )


def test_a_close_too_big_for_plain_json_travels_compressed() -> None:
    close = _big_close(30_000)
    raw = close.model_dump_json().encode()
    assert len(raw) > MAX_JSON_BYTES  # plain JSON would be refused as oversize
    wire = close.to_bytes()
    assert len(wire) < MAX_JSON_BYTES
    assert decode_close(wire) == close


def test_a_small_close_stays_plain_json() -> None:
    wire = _big_close(3).to_bytes()
    assert len(wire) < COMPRESS_ABOVE
    assert json.loads(wire)["tile_count"] == 3


def test_a_compression_bomb_is_refused_before_it_expands() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"{" + b" " * (MAX_DECODED_JSON_BYTES + 10))
    assert len(bomb) < MAX_JSON_BYTES
    with pytest.raises(ProtocolError) as refused:
        decode_close(bomb)
    assert refused.value.reason is ReasonCode.OVERSIZE
    # Without a declared size it is cut off while decoding.
    stream = zstandard.ZstdCompressor(write_content_size=False)
    unsized = stream.compress(b" " * (MAX_DECODED_JSON_BYTES + 10))
    with pytest.raises(ProtocolError) as refused:
        decode_close(unsized)
    assert refused.value.reason is ReasonCode.OVERSIZE


def test_a_corrupt_frame_is_malformed() -> None:
    """Anywhere in the frame: a flip inside the random hex digests may decode to other valid
    hex (it did, once in CI, before the frame carried its checksum)."""
    good = _big_close(20_000).to_bytes()
    for at in range(16, len(good), len(good) // 97):
        wire = bytearray(good)
        wire[at] ^= 0x01
        with pytest.raises(ProtocolError) as refused:
            decode_close(bytes(wire))
        assert refused.value.reason in (ReasonCode.MALFORMED, ReasonCode.INVALID_MANIFEST), at

from __future__ import annotations

import json
from uuid import uuid4

import pytest

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    TileAck,
    TileDigest,
    TileState,
    decode_ack,
    decode_close,
    decode_open,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic, parse_device_topic
from tilebridge_storage.testing.manifests import make_manifest


def test_open_manifest_round_trips() -> None:
    manifest = make_manifest()
    assert decode_open(manifest.to_bytes()) == manifest
    assert manifest.tile_count == 6 * 2 * 2
    assert len(set(manifest.tile_keys())) == manifest.tile_count


def test_unknown_version_is_refused_before_validation() -> None:
    data = json.loads(make_manifest().to_bytes())
    data["v"] = 2
    data["new_field_of_v2"] = True
    with pytest.raises(ProtocolError) as err:
        decode_open(json.dumps(data).encode())
    assert err.value.reason is ReasonCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "change",
    [
        {"image_name": "../../etc/passwd"},
        {"experiment": "a/b"},
        {"dataset": ""},
        {"dtype": "complex128"},
        {"tile_width": 0},
        {"channels": ["only-one"]},
        {"surprise": 1},
    ],
)
def test_invalid_manifest_fields_are_refused(change: dict[str, object]) -> None:
    data = json.loads(make_manifest().to_bytes())
    data.update(change)
    with pytest.raises(ProtocolError) as err:
        decode_open(json.dumps(data).encode())
    assert err.value.reason is ReasonCode.INVALID_MANIFEST


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1,2]", b"\xff\xfe", b'{"v": 1}'])
def test_malformed_json_is_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_open(payload)
    assert err.value.reason in (ReasonCode.MALFORMED, ReasonCode.INVALID_MANIFEST)


def test_positions_must_be_numbered_once() -> None:
    data = json.loads(make_manifest().to_bytes())
    data["positions"][1]["index"] = 0
    with pytest.raises(ProtocolError):
        decode_open(json.dumps(data).encode())


def test_close_manifest_must_list_each_tile_once() -> None:
    digest = TileDigest(tile=TileKey(0), digest="0" * 32)
    with pytest.raises(ValueError):
        CloseManifest(image_id=uuid4(), tile_count=2, digests=(digest, digest))
    close = CloseManifest(image_id=uuid4(), tile_count=1, digests=(digest,))
    assert decode_close(close.to_bytes()) == close


def test_acks_are_told_apart_by_kind() -> None:
    ack = TileAck(image_id=uuid4(), tile=TileKey(1, 2, 3, 4), state=TileState.COMMITTED)
    decoded = decode_ack(ack.to_bytes())
    assert isinstance(decoded, TileAck)
    assert decoded.tile == TileKey(1, 2, 3, 4)


def test_topics_round_trip_and_refuse_foreign_ones() -> None:
    topic = device_topic("scope-7", DeviceTopic.CHUNK)
    assert parse_device_topic(topic) == ("scope-7", DeviceTopic.CHUNK)
    for bad in [
        "tilebridge/v1/dev/scope-7/other",
        "tilebridge/v2/dev/a/chunk",
        "x/y",
        "tilebridge/v1/dev/../chunk",
    ]:
        with pytest.raises(ProtocolError):
            parse_device_topic(bad)
    with pytest.raises(ProtocolError):
        device_topic("a/b", DeviceTopic.ACK)


def test_a_close_carries_measured_plane_metadata_and_stays_compatible() -> None:
    from tilebridge_protocol.messages import PlaneMeta, TileDigest, decode_close

    digest = "0" * 32
    measured = PlaneMeta(x_um=101.5, y_um=-3.25, z_um=12.0, exposure_ms=20.0, delta_t_s=1.5)
    close = CloseManifest(
        image_id=uuid4(),
        tile_count=2,
        digests=(
            TileDigest(tile=TileKey(0), digest=digest, meta=measured),
            TileDigest(tile=TileKey(1), digest=digest),
        ),
    )
    again = decode_close(close.to_bytes())
    assert again == close
    assert again.planes() == {TileKey(0): measured}
    # A close from an edge that sends no metadata is still valid.
    plain = json.loads(close.to_bytes())
    for entry in plain["digests"]:
        entry.pop("meta")
    assert decode_close(json.dumps(plain).encode()).planes() == {}
    with pytest.raises(ProtocolError):
        bad = json.loads(close.to_bytes())
        bad["digests"][0]["meta"]["exposure_ms"] = -1
        decode_close(json.dumps(bad).encode())

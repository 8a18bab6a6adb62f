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


# -- images that end with fewer tiles: partial and sparse closes (docs/protocol.md) ---------

GRID = make_manifest(columns=3, rows=2, size_z=1, size_c=2, channels=["DAPI", "GFP"])  # 12 tiles


def close_of(keys: list[TileKey], **fields: object) -> CloseManifest:
    digests = [TileDigest(tile=k, digest=f"{n:032x}") for n, k in enumerate(keys)]
    return CloseManifest(
        image_id=GRID.image_id, tile_count=len(digests), digests=tuple(digests), **fields
    )


def test_a_sparse_close_lists_every_planned_tile_and_fits_its_open() -> None:
    planned = [k for k in GRID.tile_keys() if k.index not in (0, 2)]
    close = close_of(planned, not_planned=(0, 2))
    assert close.check(GRID) is None and close.planned_keys(GRID) == planned
    wire = json.loads(close.to_bytes())
    assert wire["not_planned"] == [0, 2] and "partial" not in wire
    assert decode_close(close.to_bytes()) == close
    # Left out of a full close, as `partial` is: an older ingest reads it unchanged.
    assert b"not_planned" not in close_of(GRID.tile_keys()).to_bytes()


def test_a_sparse_close_that_leaves_a_planned_tile_out_is_partial_or_wrong() -> None:
    planned = [k for k in GRID.tile_keys() if k.index != 0]
    assert "planned tiles without partial" in (
        close_of(planned[1:], not_planned=(0,)).check(GRID) or ""
    )
    both = close_of(planned[1:], not_planned=(0,), partial=True)
    assert both.check(GRID) is None  # a round area, stopped early


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"not_planned": (1, 0)}, "ascending"),
        ({"not_planned": (0, 0)}, "each once"),
        ({"not_planned": (-1,)}, "ascending"),
        ({"not_planned": (3,)}, "position is not_planned"),
    ],
)
def test_a_close_naming_not_planned_positions_badly_is_refused(
    fields: dict[str, object], problem: str
) -> None:
    payload = json.loads(close_of(GRID.tile_keys()[:8], partial=True).to_bytes())
    payload.update({k: list(v) for k, v in fields.items()})  # type: ignore[call-overload]
    with pytest.raises(ProtocolError, match=problem) as caught:
        decode_close(json.dumps(payload).encode())
    assert caught.value.reason is ReasonCode.INVALID_MANIFEST


def test_a_close_is_checked_against_its_open() -> None:
    keys = GRID.tile_keys()
    assert "does not declare" in (close_of([*keys[:3], TileKey(9)], partial=True).check(GRID) or "")
    assert "the open has 6" in (
        close_of(keys[:2], not_planned=(7,), partial=True).check(GRID) or ""
    )
    assert "send it as a full close" in (close_of(keys, partial=True).check(GRID) or "")
    assert "other tiles than open declared" in (close_of(keys[:-1]).check(GRID) or "")
    assert close_of(keys[:-1], partial=True).check(GRID) is None


def test_the_shape_of_a_close_tells_full_from_partial_and_ignores_digests() -> None:
    keys = GRID.tile_keys()
    partial = close_of(keys[:-1], partial=True)
    assert partial.shape() != close_of(keys).shape()
    assert partial.shape() != close_of(keys[:-2], partial=True).shape()
    other_digests = CloseManifest(
        image_id=GRID.image_id, tile_count=len(keys) - 1, partial=True,
        digests=tuple(TileDigest(tile=k, digest="f" * 32) for k in keys[:-1]),
    )  # fmt: skip
    assert other_digests.shape() == partial.shape()

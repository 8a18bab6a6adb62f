"""The answers the intake sends, built in one place."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar
from uuid import UUID

from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import clip
from server_ingest.ports import Driver
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import ErrorAck, TileAck, TileState
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic

M = TypeVar("M")


def tile_refusal(
    driver: Driver,
    device: str,
    image_id: UUID,
    tile: TileKey,
    state: TileState,
    reason: ReasonCode,
    detail: str,
) -> None:
    driver.refuse(device, reason, f"chunk of {image_id} {tuple(tile)}: {detail}")
    driver.send(
        device,
        TileAck(image_id=image_id, tile=tile, state=state, reason=reason, detail=clip(detail)),
    )


def committed(key: ImageKey, tile: TileKey) -> TileAck:
    return TileAck(image_id=key.image_id, tile=tile, state=TileState.COMMITTED)


def error_ack(
    device: str, kind: DeviceTopic, reason: ReasonCode, detail: str, image_id: UUID | None
) -> ErrorAck:
    return ErrorAck(
        image_id=image_id,
        reason=reason,
        detail=clip(detail) or "",
        topic=device_topic(device, kind),
    )


def peek_image_id(payload: bytes) -> UUID | None:
    try:
        return UUID(str(json.loads(payload)["image_id"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return None


def decoded(decode: Callable[[bytes], M], payload: bytes) -> M:
    """`decode`, with JSON nested too deeply for Python's parser refused as malformed."""
    try:
        return decode(payload)
    except RecursionError:
        raise ProtocolError(ReasonCode.MALFORMED, "JSON nested too deeply") from None

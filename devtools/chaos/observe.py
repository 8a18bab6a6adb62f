"""What the ingest says while the run goes on: acks to every device, image and ingest status.

A plain paho subscriber that reconnects quickly (the broker is killed and wiped on purpose).
It is only a witness: the verdict is made from what is stored, never from these messages,
which a wiped broker can lose. Its state is touched by paho's thread and read by others, so
every access holds its lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.messages import ImageAck, TileAck, decode_ack
from tilebridge_protocol.status import ImageStatus, IngestStatus
from tilebridge_protocol.topics import (
    IMAGE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
    DeviceTopic,
    device_filter,
    parse_device_topic,
    parse_ingest_status_topic,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalAck:
    at: float
    device: str
    state: str
    reason: str | None
    detail: str | None


class Observer:
    def __init__(self, host: str, port: int) -> None:
        self._lock = threading.Lock()
        self._image_acks: dict[UUID, list[FinalAck]] = {}
        self._image_status: dict[UUID, ImageStatus] = {}
        self._ingest: IngestStatus | None = None
        self._ingest_at = 0.0
        self.tile_acks: Counter[str] = Counter()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="tb-chaos-observer", protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(
            [
                (device_filter(DeviceTopic.ACK), 1),
                (IMAGE_STATUS_FILTER, 1),
                (INGEST_STATUS_FILTER, 1),
            ]
        )

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        try:
            self._record(msg.topic, bytes(msg.payload))
        except (ProtocolError, ValidationError, ValueError) as exc:
            log.warning("unreadable message on %s: %s", msg.topic, exc)

    def _record(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if parse_ingest_status_topic(topic) is not None:
            status = IngestStatus.model_validate_json(payload)
            with self._lock:
                self._ingest, self._ingest_at = status, now
            return
        try:
            device, _ = parse_device_topic(topic)
        except ProtocolError:  # not a device topic: the only other subscription
            image = ImageStatus.model_validate_json(payload)
            with self._lock:
                self._image_status[image.image_id] = image
        else:
            ack = decode_ack(payload)
            with self._lock:
                if isinstance(ack, ImageAck):
                    final = FinalAck(now, device, ack.state.value, ack.reason, ack.detail)
                    self._image_acks.setdefault(ack.image_id, []).append(final)
                elif isinstance(ack, TileAck):
                    self.tile_acks[ack.state.value] += 1

    # -- reading ----------------------------------------------------------------------------

    def image_acks(self, image_id: UUID) -> list[FinalAck]:
        with self._lock:
            return list(self._image_acks.get(image_id, []))

    def image_status(self, image_id: UUID) -> ImageStatus | None:
        with self._lock:
            return self._image_status.get(image_id)

    def final_phase(self, image_id: UUID) -> str | None:
        """complete / failed / rejected as the ingest last said it, or None."""
        status = self.image_status(image_id)
        acks = self.image_acks(image_id)
        if acks:
            return acks[-1].state
        if status is not None and status.phase.value in ("complete", "failed", "rejected"):
            return status.phase.value
        return None

    def ingest_status(self, since: float = 0.0) -> IngestStatus | None:
        """The ingest's last status, if it was received after `since` (monotonic)."""
        with self._lock:
            return self._ingest if self._ingest_at >= since else None

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected())

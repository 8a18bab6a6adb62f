"""A stand-in for the ingest's broker side: acks and image status land in lists."""

from __future__ import annotations

from tilebridge_protocol.messages import AnyAck, CreditAck
from tilebridge_protocol.status import ImageStatus


class FakeOutbox:
    def __init__(self) -> None:
        self.acks: list[tuple[str, AnyAck]] = []
        self.statuses: list[ImageStatus] = []

    def ack(self, device: str, ack: AnyAck) -> None:
        if not isinstance(ack, CreditAck):  # windows are not answers to a message
            self.acks.append((device, ack))

    def image_status(self, status: ImageStatus, done: bool) -> None:
        self.statuses.append(status)

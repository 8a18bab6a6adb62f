"""Stand-ins for the ingest's broker side: acks land in a list, storing is only recorded."""

from __future__ import annotations

from uuid import UUID

from server_ingest.ingest import Ack, ImageProgress
from server_ingest.ledger import ImageRecord
from tilebridge_protocol.keys import TileKey


class FakeOutbox:
    def __init__(self) -> None:
        self.acks: list[tuple[str, Ack]] = []
        self.changes = 0

    def ack(self, device: str, ack: Ack) -> None:
        self.acks.append((device, ack))

    def image_changed(self, record: ImageRecord, progress: ImageProgress) -> None:
        self.changes += 1


class FakeScheduler:
    """The storer's interface; `submitted` lists the images handed over to be finished."""

    def __init__(self) -> None:
        self.begun: list[UUID] = []
        self.ready: list[tuple[UUID, TileKey]] = []
        self.submitted: list[UUID] = []

    def begin(self, image_id: UUID) -> None:
        self.begun.append(image_id)

    def tile_ready(self, image_id: UUID, key: TileKey) -> None:
        self.ready.append((image_id, key))

    def finish(self, image_id: UUID) -> None:
        self.submitted.append(image_id)

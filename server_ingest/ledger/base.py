"""The ledger interface: the ingest's durable memory, written by one thread, in order.

The embedded default is SQLite (`sqlite.py`); the PostgreSQL implementation (`postgres.py`,
shared by several instances) keeps the same contract (tests/ingest/ledger_contract.py runs
it against both):

* `write(records)` applies every record in one transaction, in the order given, and returns
  only when they are durable. A fault that may pass (a full disk, a lost connection) raises
  `TransientError` and leaves nothing half written: the caller retries the same batch.
* Everything is keyed by `ImageKey(device, image_id)`; applying a record twice changes
  nothing (a retried batch after a lost commit answer must be safe).
* `recover()` returns every image whose tiles are still staged, with their digests (of the
  given devices only, if any are given: an instance that shares the ledger takes over the
  images of the devices it claims); `lookup()` any image, tiles only for those. Reads never
  block on writes in flight.
* The dead-letter store is bounded: `write` keeps only the newest `dead_letters_max`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from server_ingest.ledger.records import DeadLetter, ImageKey, Record, StoredImage
from tilebridge_protocol.status import ImagePhase


class Ledger(ABC):
    @abstractmethod
    def write(self, records: Sequence[Record]) -> None: ...

    @abstractmethod
    def recover(self, devices: Iterable[str] | None = None) -> list[StoredImage]: ...

    @abstractmethod
    def lookup(self, keys: Iterable[ImageKey]) -> dict[ImageKey, StoredImage]: ...

    @abstractmethod
    def images(
        self, phases: Iterable[ImagePhase] = (), device: str | None = None, limit: int = 1000
    ) -> list[StoredImage]:
        """Newest first, without tiles (admin listings)."""

    @abstractmethod
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Newest first."""

    @abstractmethod
    def close(self) -> None: ...

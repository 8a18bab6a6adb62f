"""The publisher's small parts: its mailbox (how other threads reach its owner), the
in-flight byte budget and a flight (owner thread only), the counters others read."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from edge_agent.spool import Item
from tilebridge_protocol.keys import TileKey

FlightKey = tuple[str, UUID, TileKey | None]
Event = tuple[str, Any]


class Mailbox:
    """Events for the owner thread; `ring` wakes it without an event (new spool items)."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._bell = threading.Event()

    def post(self, kind: str, value: Any = None) -> None:
        self._events.put((kind, value))
        self._bell.set()

    def ring(self) -> None:
        self._bell.set()

    def wait(self, timeout: float) -> None:
        self._bell.wait(timeout)
        self._bell.clear()

    def drain(self) -> Iterator[Event]:
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return


class Budget:
    """Tile bytes in flight (owner thread only). An item larger than the whole budget still
    goes, alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def has_room(self) -> bool:
        return self.used < self.limit

    def take(self, nbytes: int) -> None:
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


@dataclass
class Flight:
    item: Item
    attempts: int = 0
    pending_mids: set[int] = field(default_factory=set)
    deadline: float = float("inf")
    resend_now: bool = False
    sent_at: float = 0.0
    awaits_open: bool = False
    """The ingest did not know its image: sent again once the open is accepted (or at its
    deadline), not at once, so a refused open cannot start a resend storm of pixels."""


@dataclass
class Counters:
    """Written by the owner only; others read the numbers."""

    committed_tiles: int = 0
    committed_bytes: int = 0
    retransmits: int = 0
    rejected_tiles: int = 0
    images_complete: int = 0
    inflight_tiles: int = 0
    inflight_bytes: int = 0
    window_bytes: int | None = None
    """The server's window for this device (None: none granted; `inflight_bytes` caps)."""

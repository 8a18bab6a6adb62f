"""The core's one queue in. Device messages take a slot, so at most `slots` of them wait and
the network thread blocks for the next: backpressure to the broker, which then holds them
(and stops sending past its `max_inflight_messages`). Results of the core's own work never
wait for a slot: a worker blocked on the core while the core waits for it cannot happen."""

from __future__ import annotations

import queue
import threading
from typing import Literal

from server_ingest import events as ev


class Inbox:
    def __init__(self, slots: int) -> None:
        self._queue: queue.SimpleQueue[ev.InboxItem | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(slots)

    def from_network(self, message: ev.Inbound) -> None:
        self._slots.acquire()
        self._queue.put(message)

    def post(self, item: ev.InboxItem) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(None)

    def get(self, timeout: float) -> ev.InboxItem | Literal["stop", "timeout"]:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return "timeout"
        return "stop" if item is None else item

    def release(self) -> None:
        self._slots.release()

    def empty(self) -> bool:
        return self._queue.empty()

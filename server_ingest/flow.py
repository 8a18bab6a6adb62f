"""Fleet-level flow control: each device's window (tile bytes it may have in flight), granted
on its ack topic as a `CreditAck`. Pure bookkeeping on the core thread: no I/O, no clock
(time comes in as arguments).

The instance's budget (`flow.broker_bytes`: what its devices may have queued in the broker
for it, all together) is shared equally by the devices that sent anything lately, each share
clamped to [min, max]. A device is told its window on its first message and again when its
share moved by more than a quarter. A window grows only into budget nobody else holds, and a
device above its share is cut down on its next message, so the sum of the windows stays
within the budget plus one minimum window per device however fast the fleet grows. A stopped
ingest grants nothing: devices keep their last windows and wait on their own disks.
"""

from __future__ import annotations

from dataclasses import dataclass

from server_ingest.settings import FlowSettings

REGRANT_FACTOR = 1.25
"""A share that moved by more than this factor (either way) is granted anew."""
RECOUNT_S = 0.25
"""How often the devices sending lately are counted (not on every message)."""


@dataclass
class _Device:
    last_seen: float
    granted: int = 0


class Windows:
    def __init__(self, settings: FlowSettings) -> None:
        self.settings = settings
        self._devices: dict[str, _Device] = {}
        self._granted = 0
        self._counted_at = float("-inf")
        self.grants = 0

    @property
    def granted(self) -> int:
        """The sum of the windows of the devices sending lately."""
        return self._granted

    def share(self, now: float) -> int:
        s = self.settings
        if now - self._counted_at >= RECOUNT_S:
            for device, book in list(self._devices.items()):
                if now - book.last_seen >= s.active_s:  # idle: told again when it sends again
                    self._granted -= book.granted
                    del self._devices[device]
            self._counted_at = now
        share = s.broker_bytes // max(1, len(self._devices))
        return max(s.min_window_bytes, min(s.max_window_bytes, share))

    def seen(self, device: str, now: float) -> int | None:
        """`device` sent a message: its new window if it must be told one, else None."""
        book = self._devices.get(device)
        if book is None:
            book = self._devices[device] = _Device(now)
        book.last_seen = now
        share, had = self.share(now), book.granted
        if had and share / REGRANT_FACTOR <= had <= share * REGRANT_FACTOR:
            return None
        if had > share:
            window = share
        else:  # grow, but only into what nobody else holds
            free = self.settings.broker_bytes - (self._granted - had)
            window = max(self.settings.min_window_bytes, min(share, free))
            if window == had:
                return None
        self._granted += window - had
        book.granted = window
        self.grants += 1
        return window

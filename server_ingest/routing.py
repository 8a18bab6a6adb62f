"""Which instance handles a device's message: runs on the core thread only, does no I/O.

With several instances (docs/scale.md) the broker hands each device message to any member
of the shared subscription, but one device is held by one instance at a time (its claim,
server_ingest/claims.py), so its images have one lifecycle owner, as with one instance. A
message for a device we hold goes to the intake; one for a device another instance holds is
relayed to it (once: a relayed message that finds a stale route is dropped, and the device
sends it again after its timeout); one for a device nobody is known to hold waits while the
claims thread claims it or learns who holds it.

Alone (the SQLite ledger) every device is ours and nothing here does anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from server_ingest.events import Inbound, Owner

log = logging.getLogger(__name__)

NO_ONE = ""


@dataclass
class _Route:
    holder: str
    until: float
    """Monotonic time after which the route must be asked again (ours: while leases hold)."""


class Router:
    def __init__(
        self,
        me: str,
        ask: Callable[[str], None],
        relay: Callable[[str, Inbound], None],
        leases_valid_until: Callable[[], float],
        max_waiting_bytes: int,
    ) -> None:
        self.me = me
        self._ask = ask
        self._relay = relay
        self._valid_until = leases_valid_until
        self._max_waiting = max_waiting_bytes
        self._routes: dict[str, _Route] = {}
        self._waiting: dict[str, list[Inbound]] = {}
        self._waiting_bytes: dict[str, int] = {}
        self.relayed = 0
        self.dropped = 0

    def admit(self, device: str, message: Inbound, now: float) -> bool:
        """True: handle it here now. False: relayed, waiting, or dropped."""
        route = self._routes.get(device)
        if route is not None and route.holder == self.me:
            if now < self._valid_until():
                return True
            # Our leases are not proven now (the ledger unreachable): hold it; the claims
            # thread ends the process if they stay unproven.
            return self._wait(device, message)
        if route is not None and now < route.until:
            self._forward(route.holder, message)
            return False
        return self._wait(device, message)

    def answered(self, owner: Owner, now: float) -> list[Inbound]:
        """The claims thread says who holds `owner.device`; the messages to handle here now
        (the others are relayed)."""
        device = owner.device
        waiting = self._waiting.pop(device, [])
        self._waiting_bytes.pop(device, None)
        if owner.holder == self.me:
            self._routes[device] = _Route(self.me, float("inf"))
            return waiting
        if owner.holder == NO_ONE:
            self._routes.pop(device, None)
            self.dropped += len(waiting)  # the ledger could not say: the device resends
            return []
        self._routes[device] = _Route(owner.holder, now + owner.valid_s)
        for message in waiting:
            self._forward(owner.holder, message)
        return []

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def held(self) -> list[str]:
        return sorted(d for d, r in self._routes.items() if r.holder == self.me)

    def _wait(self, device: str, message: Inbound) -> bool:
        size = self._waiting_bytes.get(device, 0) + len(message.payload)
        if size > self._max_waiting:
            self.dropped += 1
            return False
        queue = self._waiting.setdefault(device, [])
        if not queue:
            self._ask(device)
        queue.append(message)
        self._waiting_bytes[device] = size
        return False

    def _forward(self, holder: str, message: Inbound) -> None:
        if message.relayed:  # a stale route at the sender: never passed on twice
            self.dropped += 1
            return
        self.relayed += 1
        self._relay(holder, message)

"""What systemd's Restart=on-failure does for the real services: a part that ends on its own
(not by a fault) is restarted after `RESTART_S`, and every such exit is counted with the tail
of its log. Parts a fault holds down are left alone until it is healed. Called by the
runner's main thread only, the one owner of the processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from devtools.chaos.stack import ChaosStack
from devtools.chaos.timeline import Timeline

RESTART_S = 2.0


@dataclass(frozen=True)
class Exit:
    part: str
    at: float
    code: int | None
    log_tail: str


class Supervisor:
    def __init__(self, stack: ChaosStack, timeline: Timeline, exits: list[Exit]) -> None:
        self.stack = stack
        self.timeline = timeline
        self.exits = exits
        self.held: set[str] = set()
        """Names of the parts the current fault holds down."""
        self._dead_since: dict[str, float] = {}

    def tick(self) -> None:
        if not self.stack.omero.alive:
            raise RuntimeError(f"the OMERO stand-in process died:\n{self.stack.omero.log_tail()}")
        now = time.monotonic()
        for name, part in self.stack.parts().items():
            if name in self.held:
                continue  # a part that died before the fault is restarted after it, once
            if part.running:
                self._dead_since.pop(name, None)
                continue
            if name not in self._dead_since:
                self._dead_since[name] = now
                exit_ = Exit(name, now, part.exit_code(), part.log_tail(30))
                self.exits.append(exit_)
                self.timeline.say(f"{name} exited by itself (status {exit_.code}); restarting")
            elif now - self._dead_since[name] >= RESTART_S:
                try:
                    part.start()
                    del self._dead_since[name]
                except RuntimeError as exc:  # e.g. the broker not listening yet
                    self._dead_since[name] = now
                    self.timeline.say(f"restarting {name} failed: {exc}")

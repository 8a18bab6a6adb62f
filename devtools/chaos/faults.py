"""What each fault kind does to the running stack, and how it is healed.

`inject` returns the parts the fault holds down, which the runner's supervisor must leave
alone until `heal` (a killed ingest is not restarted early, a stopped one not killed). Only
the runner's main thread calls these, so the stack's processes have one owner.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from devtools.chaos.plan import BOTH, FaultStep, family
from devtools.chaos.stack import ChaosStack, Part


@dataclass
class FaultEvent:
    step: FaultStep
    injected_at: float
    healed_at: float | None = None
    note: str = ""
    """What happened beyond the plan, e.g. that an armed crash never fired."""


class Injector:
    def __init__(self, stack: ChaosStack) -> None:
        self.stack = stack

    def _parts(self, step: FaultStep) -> list[Part]:
        if step.kind.startswith("agent-"):
            agents = self.stack.agents
            return list(agents.values()) if step.target == BOTH else [agents[step.target]]
        return [self.stack.parts()[step.target]]

    def inject(self, step: FaultStep) -> tuple[FaultEvent, set[str]]:
        """Start the fault; returns its event and the names of the parts it holds."""
        kind, stack = step.kind, self.stack
        event = FaultEvent(step, time.monotonic())
        held: set[str] = set()
        if family(kind) in ("kill", "stall") and kind.split("-")[0] in ("agent", "ingest"):
            down = [p.name for p in self._parts(step) if not p.running]
            if down:
                event.note = f"{', '.join(down)} already down (exited by itself)"
        if kind in ("agent-kill", "ingest-kill", "broker-kill"):
            for part in self._parts(step):
                part.kill()
                held.add(part.name)
        elif kind in ("agent-stall", "ingest-stall", "broker-stall"):
            for part in self._parts(step):
                part.pause()
                held.add(part.name)
        elif kind == "broker-restart":
            stack.broker.stop()
            held.add("broker")
        elif kind == "broker-wipe":
            stack.broker.kill()
            stack.broker.wipe()
            held.add("broker")
        elif kind == "ingest-disk-full":
            taken = stack.ingest_disk.fill(leave=step.amount)
            event.note = f"took {taken} bytes, {stack.ingest_disk.free_bytes()} left"
        elif kind == "spool-full":
            disk = stack.spools[step.target]
            taken = disk.fill(leave=step.amount)
            event.note = f"took {taken} bytes, {disk.free_bytes()} left"
        elif kind in ("omero-stop", "omero-crash"):
            stack.omero.action(kind.removeprefix("omero-"))
        elif kind == "omero-stall":
            stack.omero.signal(signal.SIGSTOP)
        elif kind == "omero-crash-mid-write":
            stack.omero.action("crash-after", set_tiles=step.amount)
        else:
            raise ValueError(f"unknown fault kind {kind}")
        return event, held

    def fired(self, event: FaultEvent) -> bool:
        """Whether the fault has happened yet (only an armed crash waits for its moment)."""
        if event.step.kind != "omero-crash-mid-write":
            return True
        state = self.stack.omero.state()
        return bool(state["crashed"] or not state["running"])

    def heal(self, event: FaultEvent) -> None:
        step, stack = event.step, self.stack
        kind = step.kind
        if kind in ("agent-kill", "ingest-kill", "broker-kill", "broker-restart", "broker-wipe"):
            for part in self._parts(step):
                part.start()
        elif kind in ("agent-stall", "ingest-stall", "broker-stall"):
            for part in self._parts(step):
                part.resume()
        elif kind == "ingest-disk-full":
            stack.ingest_disk.release()
        elif kind == "spool-full":
            stack.spools[step.target].release()
        elif kind in ("omero-stop", "omero-crash"):
            stack.omero.action("start")
        elif kind == "omero-stall":
            stack.omero.signal(signal.SIGCONT)
        elif kind == "omero-crash-mid-write":
            state = stack.omero.state()
            if state["running"] and not state["crashed"]:
                stack.omero.action("disarm")
                event.note = "did not fire: no setTile call while it was armed"
            else:
                stack.omero.action("start")
                event.note = "crashed mid-write"
        event.healed_at = time.monotonic()

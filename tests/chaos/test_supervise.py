"""The supervisor restarts what ended on its own, once per exit, and leaves alone what a
fault holds down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devtools.chaos import supervise
from devtools.chaos.supervise import Exit, Supervisor
from devtools.chaos.timeline import Timeline


class FakePart:
    def __init__(self, name: str) -> None:
        self.name, self.running, self.starts = name, True, 0

    def start(self) -> None:
        self.running, self.starts = True, self.starts + 1

    def exit_code(self) -> int | None:
        return None if self.running else 70

    def log_tail(self, lines: int = 40) -> str:
        return "thread died"


class FakeStack:
    def __init__(self) -> None:
        self.ingest, self.broker = FakePart("ingest"), FakePart("broker")
        self.omero = type("Omero", (), {"alive": True})()

    def parts(self) -> dict[str, Any]:
        return {"ingest": self.ingest, "broker": self.broker}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeStack, Supervisor]:
    monkeypatch.setattr(supervise, "RESTART_S", 0.0)
    stack = FakeStack()
    exits: list[Exit] = []
    return stack, Supervisor(stack, Timeline(tmp_path / "t.log", echo=False), exits)  # type: ignore[arg-type]


def test_a_part_that_ends_on_its_own_is_counted_once_and_restarted(
    setup: tuple[FakeStack, Supervisor],
) -> None:
    stack, supervisor = setup
    stack.ingest.running = False
    supervisor.tick()
    assert [(e.part, e.code) for e in supervisor.exits] == [("ingest", 70)]
    assert stack.ingest.starts == 0  # restarted only after RESTART_S, on a later tick
    supervisor.tick()
    supervisor.tick()
    assert stack.ingest.starts == 1 and stack.ingest.running
    assert len(supervisor.exits) == 1 and stack.broker.starts == 0


def test_a_held_part_is_left_alone_and_an_earlier_exit_is_not_counted_twice(
    setup: tuple[FakeStack, Supervisor],
) -> None:
    stack, supervisor = setup
    stack.ingest.running = False
    supervisor.tick()  # died on its own: counted
    supervisor.held = {"ingest"}  # then a fault targets it
    for _ in range(3):
        supervisor.tick()
    assert stack.ingest.starts == 0
    supervisor.held = set()
    supervisor.tick()
    assert stack.ingest.starts == 1 and len(supervisor.exits) == 1
    stack.broker.running = False
    supervisor.held = {"broker"}  # killed by the fault: not an exit of its own
    supervisor.tick()
    assert len(supervisor.exits) == 1


def test_the_stand_in_dying_ends_the_run(setup: tuple[FakeStack, Supervisor]) -> None:
    stack, supervisor = setup
    stack.omero.alive = False
    stack.omero.log_tail = lambda: "MemoryError"
    with pytest.raises(RuntimeError, match="stand-in process died"):
        supervisor.tick()

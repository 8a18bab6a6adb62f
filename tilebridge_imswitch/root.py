"""The adapter's one composition root: settings loaded once, the edge port wired once.

ImSwitch constructs `OMEWriter` with its own arguments only, so writers find the process's
session here (`session()`), made on first use from `AdapterSettings.load()`. Tests and
programs that embed the adapter call `configure(...)` first (or pass `edge=` to a writer).
`close()` ends it (the fast-path connection closed, the in-process agent stopped).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilebridge_imswitch.port import Edge
from tilebridge_imswitch.settings import AdapterSettings, OmeroTargets, setup_targets

if TYPE_CHECKING:
    from edge_agent.frontdoor import FrontDoor

log = logging.getLogger(__name__)


@dataclass
class Session:
    settings: AdapterSettings
    edge: Edge
    targets: OmeroTargets
    """What ImSwitch's setup JSON says about OMERO (targets only)."""
    closers: list[Any] = field(default_factory=list)
    stems: set[Path] = field(default_factory=set)
    """Output names taken by this process's writers (see `take_stem`)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_stem(self, folder: Path, stem: str, taken_on_disk: Any) -> str:
        """`stem`, or `stem_2`, `stem_3`, ... : the first that no writer of this process
        holds and whose outputs do not exist yet (`taken_on_disk(name) -> bool`). ImSwitch
        names performance-mode writers by the second they start in; two in one second must
        not write into each other's files."""
        with self.lock:
            n = 1
            while True:
                name = stem if n == 1 else f"{stem}_{n}"
                if folder / name not in self.stems and not taken_on_disk(name):
                    self.stems.add(folder / name)
                    return name
                n += 1

    def release_stem(self, folder: Path, stem: str) -> None:
        with self.lock:
            self.stems.discard(folder / stem)


_current: Session | None = None
_lock = threading.Lock()


def configure(settings: AdapterSettings | None = None, edge: Edge | None = None) -> Session:
    """Replace the process's session (closing the old one)."""
    global _current
    settings = settings or AdapterSettings.load()
    targets = setup_targets(settings.imswitch_setup)
    closers: list[Any] = []
    made = Session(settings, edge or _wire(settings, closers), targets, closers)
    with _lock:
        old, _current = _current, made
    if old is not None:
        _close(old)
    return made


def session() -> Session:
    with _lock:
        current = _current
    return current if current is not None else configure()


def close() -> None:
    global _current
    with _lock:
        old, _current = _current, None
    if old is not None:
        _close(old)


def _wire(settings: AdapterSettings, closers: list[Any]) -> Edge:
    """The edge's front door, over its fast path (the agent service) or in this process."""
    from tilebridge_imswitch.edge_frontdoor import FrontDoorEdge

    door: FrontDoor
    if settings.edge == "fastpath":
        from edge_agent.fastpath_client import FastPathClient

        client = FastPathClient(settings.edge_socket)
        closers.append(client.close)
        door = client
    else:
        from edge_agent.app import EdgeApp
        from edge_agent.settings import AgentSettings

        agent = EdgeApp(AgentSettings.load(settings.agent_config)).start()
        closers.append(agent.stop)
        door = agent.acquisition
    return FrontDoorEdge(door, settings.stream_to_server, settings.finalize_timeout_s)


def _close(old: Session) -> None:
    for closer in reversed(old.closers):
        try:
            closer()
        except Exception as exc:  # closing is best effort; say so and go on
            log.warning("closing the ImSwitch adapter: %s", exc)

"""The run's own log: what the runner did and saw, with seconds since the start."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.console import Console


class Timeline:
    def __init__(self, path: Path, echo: bool = True) -> None:
        self.path = path
        self.started = time.monotonic()
        self.echo = echo
        self._console = Console(stderr=True, highlight=False)
        if not self._console.is_terminal:
            self._console = Console(stderr=True, highlight=False, width=160)
        self._lock = threading.Lock()  # the main thread and the microscopes both write

    def offset(self, at: float) -> float:
        return at - self.started

    def say(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:8.1f} s  {text}"
        with self._lock, open(self.path, "a") as log:
            log.write(line + "\n")
        if self.echo:
            self._console.print(line, markup=False)

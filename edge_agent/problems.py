"""What is wrong right now, keyed by the condition, so a message leaves the status when its
condition clears (a stale "image refused" after a good run is worse than none)."""

from __future__ import annotations

import threading
from collections.abc import Hashable


class Problems:
    """Conditions -> messages. Set and cleared by their owner; read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[Hashable, str] = {}

    def set(self, condition: Hashable, message: str) -> None:
        with self._lock:
            self._messages.pop(condition, None)
            self._messages[condition] = message  # newest last

    def clear(self, condition: Hashable) -> None:
        with self._lock:
            self._messages.pop(condition, None)

    def clear_images(self) -> None:
        """Forget every per-image message (`("image", id)` conditions)."""
        with self._lock:
            for condition in [
                c for c in self._messages if isinstance(c, tuple) and c[0] == "image"
            ]:
                del self._messages[condition]

    def latest(self) -> str | None:
        with self._lock:
            return next(reversed(self._messages.values()), None)

    def all(self) -> list[str]:
        with self._lock:
            return list(self._messages.values())

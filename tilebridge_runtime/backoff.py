"""Exponential backoff with full jitter, for every "try again later" in both services."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter: 'try again' delays that spread out retries."""

    def __init__(self, first_s: float = 0.5, max_s: float = 60.0, rng: random.Random | None = None):
        self.first_s = first_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.first_s * 2**self.attempt)
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

"""A token bucket that caps the agent's upload rate (`bandwidth_limit_bytes_per_s`).

The cap is on bytes handed to the broker client, i.e. wire bytes after compression, so a
compressible scan gets through a capped link faster with zstd than raw.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable


class TokenBucket:
    """`rate` bytes per second on average, bursts up to `burst` bytes.

    A request larger than the bucket is let through once the bucket is full and leaves it in
    debt, so any message size works and the long-run rate still holds.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.rate = 0.0
        self.burst = 0.0
        self.set_rate(rate, burst)
        self._tokens = self.burst
        self._stamp = clock()

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        with self._lock:
            self.rate = float(rate)
            # A quarter second of traffic: smooth enough for a link, coarse enough for sleep().
            self.burst = float(burst) if burst is not None else max(self.rate / 4, 1.0)

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` now; return how long the caller must wait before sending them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
            self._tokens -= nbytes
            return wait

    def acquire(self, nbytes: int, stop: threading.Event | None = None) -> None:
        """Block until `nbytes` may go; returns early if `stop` is set."""
        wait = self.reserve(nbytes)
        if wait > 0:
            if stop is None:
                time.sleep(wait)
            else:
                stop.wait(wait)


_buckets: weakref.WeakKeyDictionary[object, TokenBucket] = weakref.WeakKeyDictionary()
_buckets_lock = threading.Lock()


def throttle(
    owner: object, rate: float | None, nbytes: int, stop: threading.Event | None = None
) -> None:
    """Wait until `owner` (e.g. one publisher) may send `nbytes` at `rate` bytes/s.

    `rate` is read on every call, so a limit changed at run time applies to the next message;
    None means no limit.
    """
    if rate is None:
        return
    with _buckets_lock:
        bucket = _buckets.get(owner)
        if bucket is None:
            bucket = _buckets[owner] = TokenBucket(rate)
        elif bucket.rate != rate:
            bucket.set_rate(rate)
    bucket.acquire(nbytes, stop)

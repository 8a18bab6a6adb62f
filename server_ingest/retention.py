"""Staging retention and disk pressure: which staged images go, and what is refused when
the staging disk runs low. The rules are pure (the core applies them on its thread); the
one blocking call, `statvfs`, runs on the "ingest-disk" thread (`DiskWatch`).

What is kept (docs/operations.md, "Disk and retention"):

* a stored image: its staged tiles are removed once every backend holds it, unless
  `keep_staged`; then `retention.stored_s` after it was stored, or at once when the disk
  runs low (a stored image's staged copy is the first thing to go);
* a failed image: until an admin retries or discards it, or `retention.failed_s`;
* an abandoned image (expired: never closed): `retention.abandoned_s` after it expired.

What is refused under pressure, in this order, with reason `unavailable` (nothing is
recorded; the device keeps the data and sends it again later):

1. free space below `retention.reserve_bytes`: new images (their `open`); the images
   already receiving go on and finish, so a scan in progress is not cut;
2. below `retention.floor_bytes`: chunks too. Acks, storing and the ledger go on, and every
   image stored frees its tiles.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from server_ingest.events import DiskSpace, InboxItem
from server_ingest.ledger.records import ImageKey
from server_ingest.settings import Retention
from tilebridge_protocol.status import ImagePhase as Phase

log = logging.getLogger(__name__)

NONE, NEW_IMAGES_REFUSED, TILES_REFUSED = "none", "new_images_refused", "tiles_refused"
KEPT_MIN_AGE_S = 120.0
"""A staging folder this young is never swept as a kept copy, whatever the core held when
it asked: it may belong to an image opened since."""


def pressure(free: int, policy: Retention) -> str:
    if free < policy.floor_bytes:
        return TILES_REFUSED
    if free < policy.reserve_bytes:
        return NEW_IMAGES_REFUSED
    return NONE


@dataclass(frozen=True)
class Due:
    key: ImageKey
    phase: Phase
    detail: str


def due(
    held: Iterable[tuple[ImageKey, Phase, float, bool]], policy: Retention, now: float
) -> list[Due]:
    """The held images whose time is up: (key, phase, since when, has staged tiles)."""
    out = []
    for key, phase, since, staged in held:
        limit = {Phase.FAILED: policy.failed_s, Phase.EXPIRED: policy.abandoned_s}.get(phase)
        if limit is None or not staged or now - since < limit:
            continue
        days = (now - since) / 86400
        what = "failed" if phase is Phase.FAILED else "abandoned (never closed)"
        out.append(
            Due(key, phase, f"removed by the staging retention policy: {what} {days:.1f} days ago")
        )
    return out


class DiskWatch:
    """Posts the staging disk's free space every `interval_s` ("ingest-disk")."""

    def __init__(
        self,
        path: Path,
        post: Callable[[InboxItem], None],
        interval_s: float,
        free: Callable[[Path], int] | None = None,
    ) -> None:
        self._path = path
        self._post = post
        self._interval = interval_s
        self._free = free or free_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-disk", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            try:
                self._post(DiskSpace(self._free(self._path)))
            except OSError as exc:  # a disk that cannot say is logged, and asked again
                log.error("cannot read the free space of %s: %s", self._path, exc)
            if self._stop.wait(self._interval):
                return


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

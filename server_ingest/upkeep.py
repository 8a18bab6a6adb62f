"""What the core does about administrators and the staging disk: an admin's retry or
discard, the retention policy on each tick, disk pressure from the "ingest-disk" thread.
Runs on the core thread only (see core.py), does no I/O: folder sweeps go to the stager.
The rules themselves are `retention.py`."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from server_ingest import events as ev
from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import Discard, Event
from server_ingest.ports import StagerPort
from server_ingest.retention import KEPT_MIN_AGE_S, NONE, due, pressure
from server_ingest.settings import Retention
from server_ingest.stager import SweepKept
from server_ingest.state import CoreState

log = logging.getLogger(__name__)


class Applier(Protocol):
    """What upkeep asks of the core (core.Core implements it)."""

    def apply(self, key: ImageKey, event: Event, manifest_size: int = 0) -> None: ...


class Upkeep:
    def __init__(
        self,
        state: CoreState,
        core: Applier,
        stager: StagerPort,
        retention: Retention,
        keep_staged: bool,
    ) -> None:
        self.state = state
        self.core = core
        self.stager = stager
        self.retention = retention
        self.keep_staged = keep_staged
        self._swept_at = 0.0

    def handle(self, item: ev.AdminRequest | ev.DiskSpace | ev.StagingSwept) -> None:
        if isinstance(item, ev.AdminRequest):
            self.admin(item)
        elif isinstance(item, ev.DiskSpace):
            self.disk(item.free)
        elif item.removed:
            self.state.stats.retention_removed["stored"] += item.removed
            log.info(
                "retention: removed the staged copies of %d stored images (%d bytes)",
                item.removed, item.freed,
            )  # fmt: skip

    # -- administrators -------------------------------------------------------------------

    def admin(self, request: ev.AdminRequest) -> None:
        """Apply an admin's retry or discard to an image the core holds, and say what became
        of it. Only held images have staged tiles to retry from or to discard."""
        key, event = request.key, request.event
        book = self.state.images.get(key)
        if book is None:
            finished = self.state.finished.get(key)
            phase = finished.phase.value if finished else "not held"
            answer = ev.AdminAnswer(False, None, f"image {key} has no staged tiles ({phase})")
        else:
            before = book.image.phase
            self.core.apply(key, event)
            after = self.state.images.get(key)
            now = after.image.phase if after else self.state.finished[key].phase
            ok = now is not before
            verb = type(event).__name__.lower()
            message = (
                f"image {key}: {before.value} -> {now.value}"
                if ok
                else f"image {key} is {before.value}: nothing to {verb}"
            )
            if ok:
                log.warning("%s by an administrator (%s): %s", verb, request.by, message)
            answer = ev.AdminAnswer(ok, now.value, message)
        if not request.reply.done():
            request.reply.set_result(answer)

    # -- retention and disk pressure ------------------------------------------------------

    def tick(self, at: float) -> None:
        images = self.state.images
        held = [(k, b.image.phase, b.phase_since, bool(b.staged)) for k, b in images.items()]
        for item in due(held, self.retention, at):
            log.warning("image %s: %s", item.key, item.detail)
            self.state.stats.retention_removed[item.phase.value] += 1
            self.core.apply(item.key, Discard(at, item.detail))
        # Kept copies of stored images: a folder listing, so only every 12th check.
        due_at = self._swept_at + 12 * self.retention.check_interval_s
        if self.keep_staged and self.retention.stored_s is not None and time.monotonic() >= due_at:
            self._swept_at = time.monotonic()
            self._sweep(max(self.retention.stored_s, KEPT_MIN_AGE_S))

    def disk(self, free: int) -> None:
        stats = self.state.stats
        stats.staging_free_bytes = free
        level = pressure(free, self.retention)
        if level == stats.disk_pressure:
            return
        stats.disk_pressure = level
        if level == NONE:
            log.info("staging disk: %d bytes free again, taking everything", free)
            return
        log.error(
            "staging disk low: %d bytes free (reserve %d, floor %d): %s",
            free, self.retention.reserve_bytes, self.retention.floor_bytes,
            level.replace("_", " "),
        )  # fmt: skip
        if self.keep_staged:  # kept copies of stored images are the first to go
            self._sweep(KEPT_MIN_AGE_S)

    def _sweep(self, min_age_s: float) -> None:
        self.stager.submit(SweepKept(frozenset(self.state.images), min_age_s))

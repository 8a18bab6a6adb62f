"""Feeds each image into every backend while its tiles arrive, and finishes it at close.

An image's writers are opened when its `open` manifest is accepted and get each tile as soon
as it is committed, so a backend that writes in its own order (OMERO pyramids, band by band)
works during the acquisition instead of after it. Each backend of an image has its own state:

* a backend that is unreachable (`TransientError`) is aborted and retried with backoff; the
  retry opens a fresh writer and feeds it every tile staged so far (a partial OMERO pyramid
  cannot be resumed, the backend deletes it and writes again), while the other backends go on;
* a backend that refuses for good (`PermanentError`) fails the image with its reason; the
  tiles stay staged;
* a backend that finished is recorded in the ledger and never written again, also after a
  restart.

Every event of one image goes to the same worker thread, in order, so a writer is only ever
used by one thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Protocol
from uuid import UUID

from server_ingest.ledger import Ledger, Phase
from server_ingest.staging import Staging
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_runtime.backoff import Backoff
from tilebridge_storage.base import ImageWriter, StorageBackend

log = logging.getLogger(__name__)

EventKind = Literal["begin", "tile", "finish", "retry", "stop"]


class StoreListener(Protocol):
    def stored(self, image_id: UUID, locations: dict[str, str]) -> None: ...

    def store_failed(self, image_id: UUID, reason: ReasonCode, detail: str) -> None: ...

    def store_delayed(self, image_id: UUID, detail: str) -> None: ...


@dataclass
class _Lane:
    """One backend's progress on one image."""

    backend: StorageBackend
    writer: ImageWriter | None = None
    fed: set[TileKey] = field(default_factory=set)
    retry_at: float = 0.0
    """When to (re)open the writer and feed it every staged tile; used while `writer` is None."""
    backoff: Backoff | None = None


@dataclass
class _Job:
    image_id: UUID
    device: str
    manifest: OpenManifest
    lanes: dict[str, _Lane]
    locations: dict[str, str]
    finishing: bool = False


class Storer:
    def __init__(
        self,
        backends: Sequence[StorageBackend],
        ledger: Ledger,
        staging: Staging,
        keep_staged: bool = False,
        retry_s: float = 5.0,
        retry_max_s: float = 300.0,
        workers: int = 2,
    ) -> None:
        self.backends = list(backends)
        self.ledger = ledger
        self.staging = staging
        self.keep_staged = keep_staged
        self.listener: StoreListener | None = None
        self.backend_state: dict[str, str] = {b.name: "ok" for b in self.backends}
        self._retry = (retry_s, retry_max_s)
        self._queues: list[queue.Queue[tuple[EventKind, UUID | None, TileKey | None]]] = [
            queue.Queue() for _ in range(workers)
        ]
        self._active = [0] * workers
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"ingest-storer-{n}", daemon=True)
            for n, q in enumerate(self._queues)
        ]

    # -- called by the ingest (never blocks) --------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for q in self._queues:
            q.put(("stop", None, None))
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        for backend in self.backends:
            backend.close()

    def begin(self, image_id: UUID) -> None:
        """The image was opened (or the ingest restarted): open writers, feed staged tiles."""
        self._post("begin", image_id)

    def tile_ready(self, image_id: UUID, key: TileKey) -> None:
        self._post("tile", image_id, key)

    def finish(self, image_id: UUID) -> None:
        """Every tile is staged and the close manifest is in: finish every backend."""
        self._post("finish", image_id)

    def busy(self) -> int:
        """Images some backend is still working on."""
        return sum(self._active)

    def _post(self, kind: EventKind, image_id: UUID, key: TileKey | None = None) -> None:
        self._queues[image_id.int % len(self._queues)].put((kind, image_id, key))

    # -- the worker ---------------------------------------------------------------------------

    def _work(self, events: queue.Queue[tuple[EventKind, UUID | None, TileKey | None]]) -> None:
        worker = self._queues.index(events)
        jobs: dict[UUID, _Job] = {}
        while True:
            due = [
                lane.retry_at
                for j in jobs.values()
                for lane in j.lanes.values()
                if lane.writer is None
            ]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            try:
                kind, image_id, key = events.get(timeout=timeout)
            except queue.Empty:
                kind, image_id, key = "retry", None, None
            if kind == "stop":
                for job in jobs.values():
                    _abort(job)
                return
            if image_id is not None:
                self._guarded(jobs, image_id, partial(self._apply, jobs, kind, image_id, key))
            for job_id in list(jobs):  # retries that are due, finishing backends
                self._guarded(jobs, job_id, partial(self._advance, jobs, jobs[job_id]))
            self._active[worker] = len(jobs)

    def _guarded(self, jobs: dict[UUID, _Job], image_id: UUID, step: Callable[[], None]) -> None:
        try:
            step()
        except PermanentError as exc:
            self._fail(jobs.pop(image_id, None), image_id, str(exc))
        except Exception as exc:  # a bug in a backend must not kill the worker
            log.exception("image %s: unexpected error while storing", image_id)
            self._fail(jobs.pop(image_id, None), image_id, repr(exc))

    def _apply(
        self, jobs: dict[UUID, _Job], kind: EventKind, image_id: UUID, key: TileKey | None
    ) -> None:
        job = jobs.get(image_id)
        if job is None:
            job = self._load(image_id)
            if job is None:
                return
            jobs[image_id] = job
        if kind == "finish":
            job.finishing = True
        elif kind == "tile" and key is not None:
            for lane in job.lanes.values():
                if lane.writer is not None:
                    self._transient_safe(job, lane, partial(self._feed, job, lane, [key]))

    def _advance(self, jobs: dict[UUID, _Job], job: _Job) -> None:
        now = time.monotonic()
        for lane in job.lanes.values():
            if lane.writer is None and lane.retry_at <= now:
                self._transient_safe(job, lane, partial(self._sync, job, lane))
        if job.finishing:
            for name, lane in list(job.lanes.items()):
                if lane.writer is not None:
                    self._transient_safe(job, lane, partial(self._finish_lane, job, name, lane))
        if not job.lanes:
            jobs.pop(job.image_id, None)
            if not self.keep_staged:
                self.staging.remove_image(job.device, job.image_id)
            if self.listener:
                self.listener.stored(job.image_id, job.locations)

    # -- one backend of one image -----------------------------------------------------------

    def _load(self, image_id: UUID) -> _Job | None:
        record = self.ledger.image(image_id)
        if record is None or record.manifest is None:
            return None
        if record.phase not in (Phase.RECEIVING, Phase.STORING):
            return None
        lanes = {b.name: _Lane(b) for b in self.backends if b.name not in record.locations}
        job = _Job(image_id, record.device, record.manifest, lanes, dict(record.locations))
        job.finishing = record.phase is Phase.STORING
        return job

    def _sync(self, job: _Job, lane: _Lane) -> None:
        """Open a fresh writer and feed it every tile staged so far."""
        lane.writer = lane.backend.open_image(job.device, job.manifest)
        lane.fed = set()
        self._feed(job, lane, list(self.ledger.tiles(job.image_id)))
        if lane.backoff is not None:
            log.info("image %s: %s is writing again", job.image_id, lane.backend.name)
        lane.backoff = None
        self.backend_state[lane.backend.name] = "ok"

    def _feed(self, job: _Job, lane: _Lane, keys: list[TileKey]) -> None:
        assert lane.writer is not None
        for key in keys:
            if key not in lane.fed:
                lane.writer.write_tile(key, self.staging.load(job.device, job.manifest, key))
                lane.fed.add(key)

    def _finish_lane(self, job: _Job, name: str, lane: _Lane) -> None:
        self._feed(job, lane, list(self.ledger.tiles(job.image_id)))
        assert lane.writer is not None
        stored = lane.writer.finish()
        job.locations[name] = stored.location
        del job.lanes[name]
        self.ledger.set_phase(job.image_id, Phase.STORING, locations=job.locations)
        log.info("image %s stored in %s: %s", job.image_id, name, stored.location)

    def _transient_safe(self, job: _Job, lane: _Lane, step: Callable[[], None]) -> None:
        """Run `step`; on a transient fault park this backend and schedule a full retry."""
        try:
            step()
        except TransientError as exc:
            if lane.writer is not None:
                _quiet_abort(lane.writer)
            lane.writer = None
            lane.backoff = lane.backoff or Backoff(*self._retry)
            delay = lane.backoff.next_delay()
            lane.retry_at = time.monotonic() + delay
            name = lane.backend.name
            self.backend_state[name] = str(exc)
            log.warning(
                "image %s: %s unavailable (%s); retrying in %.1f s", job.image_id, name, exc, delay
            )
            if self.listener:
                self.listener.store_delayed(job.image_id, f"{name}: {exc}")

    def _fail(self, job: _Job | None, image_id: UUID, detail: str) -> None:
        if job is not None:
            _abort(job)
        log.error("image %s: %s", image_id, detail)
        if self.listener:
            self.listener.store_failed(image_id, ReasonCode.STORAGE_FAILED, detail)


def _abort(job: _Job) -> None:
    for lane in job.lanes.values():
        if lane.writer is not None:
            _quiet_abort(lane.writer)
            lane.writer = None


def _quiet_abort(writer: ImageWriter) -> None:
    try:
        writer.abort()
    except Exception:  # abort is best effort; the next attempt replaces partial output anyway
        log.exception("abort of a %s writer failed", type(writer).__name__)

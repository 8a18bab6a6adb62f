"""Feeds each image into every backend while its tiles arrive, and finishes it at close.

Worker threads ("ingest-storer-<n>") own the backend writers: every command about one image
goes to the same worker, in order, so a writer is only ever used by one thread. The core
sends commands (`begin`, `tile`, `finish`, `cancel`); the workers post what happened back to
the core as events and keep no state anyone else reads. Each backend of an image has a lane:

* a backend that faults in a way that may pass is aborted and retried with backoff; the
  retry opens a fresh writer and feeds it every tile staged so far (a partial OMERO pyramid
  cannot be resumed) while the other backends go on. `TransientError` is such a fault, and
  so is any exception that is not a `PermanentError`: a lost or crashing OMERO session, a
  short write on a full disk or a bug in a backend must never fail an image for good;
* a backend that refuses for good (`PermanentError`) fails the image with its reason; the
  tiles stay staged;
* a backend that finished is reported (`Stored`) and recorded by the core, so it is never
  written again, also after a restart;
* a backend that reads back other pixels than it was given (`DigestMismatchError`) is
  rewritten like a transient fault, but at most `verify_attempts` times: then the image
  fails with `verify_failed`;
* with several instances, a backend's writer opens only once this instance holds the image
  store's claim (server_ingest/claims.py): held by another (a dead instance, until its lease
  runs out) it is a fault that may pass, retried like any other.

An image whose close lists fewer tiles than its open (sparse or partial: `Holdings`) is told
so (`ImageWriter.expect`) before it is finished; a writer already fed a tile the close
leaves out is started afresh without it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from server_ingest.claims import STORE, Claims, LocalClaims, store_name
from server_ingest.destinations import Destinations
from server_ingest.events import BackendHealth, ForImage, InboxItem, StoreAttempt
from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import Stored, StoreDelayed, StoreDone, StoreFailed
from server_ingest.staging import Staging
from tilebridge_protocol.errors import PermanentError, TilebridgeError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_runtime.backoff import Backoff
from tilebridge_storage.base import DigestMismatchError, Holdings, ImageWriter, StorageBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Begin:
    key: ImageKey
    manifest: OpenManifest
    done: frozenset[str]
    """Backends that already hold the image."""
    staged: tuple[TileKey, ...]


@dataclass(frozen=True, slots=True)
class Tile:
    key: ImageKey
    tile: TileKey


@dataclass(frozen=True, slots=True)
class Finish:
    key: ImageKey
    close: CloseManifest


@dataclass(frozen=True, slots=True)
class Cancel:
    key: ImageKey


Command = Begin | Tile | Finish | Cancel


@dataclass
class _Lane:
    """One backend's progress on one image."""

    backend: StorageBackend
    writer: ImageWriter | None = None
    fed: set[TileKey] = field(default_factory=set)
    retry_at: float = 0.0
    """When to (re)open the writer and feed it every staged tile; used while `writer` is None."""
    backoff: Backoff | None = None
    started: float = 0.0
    nbytes: int = 0
    mismatches: int = 0
    """Writes whose read-back did not match (bounded by `verify_attempts`)."""


@dataclass
class _Job:
    begin: Begin
    lanes: dict[str, _Lane]
    staged: list[TileKey]
    close: CloseManifest | None = None
    holdings: Holdings | None = None
    """What the close says the image holds, when that is fewer tiles than the open's."""

    def holds(self, key: TileKey) -> bool:
        return self.holdings is None or key in self.holdings.tiles


class Storer:
    def __init__(
        self,
        backends: Sequence[StorageBackend],
        staging: Staging,
        post: Callable[[InboxItem], None],
        retry_s: float = 5.0,
        retry_max_s: float = 300.0,
        workers: int = 2,
        verify_attempts: int = 3,
        router: Destinations | None = None,
        claims: Claims | None = None,
    ) -> None:
        self._claims = claims or LocalClaims("")
        self.backends = list(backends)
        self._staging = staging
        self._post = post
        self._retry = (retry_s, retry_max_s)
        self._verify_attempts = verify_attempts
        self.router = router or Destinations(
            [b.name for b in backends if b.kind != "omero"],
            [b.name for b in backends if b.kind == "omero"],
        )
        # One pool of workers per OMERO target (and one for images going to none): an
        # unreachable target blocks only the workers of the images routed to it.
        self._pools: dict[str, list[queue.SimpleQueue[Command | None]]] = {
            pool: [queue.SimpleQueue() for _ in range(workers)]
            for pool in ("", *self.router.targets)
        }
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(q,),
                name=f"ingest-storer-{f'{pool}-' if pool else ''}{n}",
                daemon=True,
            )
            for pool, queues in self._pools.items()
            for n, q in enumerate(queues)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        for backend in self.backends:  # one-shot: a slow OMERO login must not hold anything
            threading.Thread(
                target=self._check, args=(backend,), name=f"ingest-check-{backend.name}",
                daemon=True,
            ).start()  # fmt: skip

    def _check(self, backend: StorageBackend) -> None:
        try:
            backend.check()
        except Exception as exc:
            detail = str(exc) or type(exc).__name__
            log.error("storage %s is not usable at start-up: %s", backend.name, detail)
            self._post(BackendHealth(backend.name, f"start-up check failed: {detail}"))
            return
        log.info("storage %s: writable", backend.name)

    def stop(self) -> None:
        for queues in self._pools.values():
            for q in queues:
                q.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)
        for backend in self.backends:
            backend.close()

    def submit(self, command: Command) -> None:
        """Never blocks; commands about one image keep their order. A `begin` goes to a
        worker of its OMERO target's pool; later commands go to that worker's peer in every
        pool (the workers without the image ignore them), as they do not name the target."""
        n = command.key.image_id.int % len(self._pools[""])
        if isinstance(command, Begin):
            target = self.router.route(command.key.device, command.manifest).target
            self._pools[target][n].put(command)
            return
        for queues in self._pools.values():
            queues[n].put(command)

    # -- the worker ---------------------------------------------------------------------------

    def _work(self, commands: queue.SimpleQueue[Command | None]) -> None:
        jobs: dict[ImageKey, _Job] = {}
        while True:
            due = [
                lane.retry_at
                for j in jobs.values()
                for lane in j.lanes.values()
                if lane.writer is None
            ]
            command: Command | Literal["wake"] | None
            try:
                command = commands.get(
                    timeout=max(0.0, min(due) - time.monotonic()) if due else None
                )
            except queue.Empty:
                command = "wake"  # a retry is due
            if command is None:
                for job in jobs.values():
                    _abort(job)
                return
            if command != "wake":
                self._apply(jobs, command)
            for key in list(jobs):  # retries that are due, finishing backends
                self._advance(jobs, jobs[key])

    def _apply(self, jobs: dict[ImageKey, _Job], command: Command) -> None:
        if isinstance(command, Begin):
            if command.key in jobs:
                _abort(jobs.pop(command.key))
            routed = self.router.route(command.key.device, command.manifest)
            if routed.problem is not None:
                log.error("image %s: %s", command.key, routed.problem)
                failed = StoreFailed(
                    time.time(), "routing", ReasonCode.STORAGE_FAILED, routed.problem
                )
                self._post(ForImage(command.key, failed))
                return
            lanes = {
                b.name: _Lane(b)
                for b in self.backends
                if b.name in routed.backends and b.name not in command.done
            }
            jobs[command.key] = _Job(command, lanes, list(command.staged))
            return
        job = jobs.get(command.key)
        if job is None:
            return
        if isinstance(command, Cancel):
            self._drop(jobs.pop(command.key))
        elif isinstance(command, Finish):
            job.close = command.close
            job.holdings = Holdings.of(job.begin.manifest, command.close)
            job.staged = [key for key in job.staged if job.holds(key)]
            for lane in job.lanes.values():
                if lane.writer is not None and not all(map(job.holds, lane.fed)):
                    _quiet_abort(lane.writer)  # it holds a tile the close left out
                    lane.writer, lane.retry_at = None, 0.0
        elif command.tile not in job.staged:
            job.staged.append(command.tile)
            for lane in job.lanes.values():
                if lane.writer is not None:
                    self._guard(jobs, job, lane, partial(self._feed, job, lane))

    def _advance(self, jobs: dict[ImageKey, _Job], job: _Job) -> None:
        now = time.monotonic()
        for lane in list(job.lanes.values()):
            if lane.writer is None and lane.retry_at <= now:
                self._guard(jobs, job, lane, partial(self._open, job, lane))
        if job.close is not None:
            for name, lane in list(job.lanes.items()):
                if lane.writer is not None:
                    self._guard(jobs, job, lane, partial(self._finish, job, name, lane))
        if job.begin.key in jobs and not job.lanes and job.close is not None:
            del jobs[job.begin.key]
            self._post(ForImage(job.begin.key, StoreDone(time.time())))

    # -- one backend of one image -----------------------------------------------------------

    def _open(self, job: _Job, lane: _Lane) -> None:
        """Open a fresh writer and feed it every tile staged so far."""
        lane.started, lane.nbytes, lane.fed = time.monotonic(), 0, set()
        key = job.begin.key
        claim = self._claims.claim(STORE, store_name(*key, lane.backend.name))
        if claim.holder != self._claims.me:
            raise TransientError(
                f"{key} is being written by {claim.holder or 'another instance'} "
                f"(its claim runs {claim.valid_s:.0f} s more)"
            )
        lane.writer = lane.backend.open_image(key.device, job.begin.manifest)
        self._feed(job, lane)
        if lane.backoff is not None:
            log.info("image %s: %s is writing again", job.begin.key, lane.backend.name)
        lane.backoff = None

    def _feed(self, job: _Job, lane: _Lane) -> None:
        assert lane.writer is not None
        manifest, device = job.begin.manifest, job.begin.key.device
        for key in job.staged:
            if key not in lane.fed and job.holds(key):
                lane.writer.write_tile(key, self._staging.load(device, manifest, key))
                lane.fed.add(key)
                lane.nbytes += manifest.tile_bytes

    def _finish(self, job: _Job, name: str, lane: _Lane) -> None:
        assert lane.writer is not None and job.close is not None
        self._feed(job, lane)
        if job.holdings is not None:
            lane.writer.expect(job.holdings)
        lane.writer.add_planes(job.close.planes())
        stored = lane.writer.finish()
        del job.lanes[name]
        self._attempt(lane, "ok")
        self._post(BackendHealth(name, "ok"))  # only a durable, finished image proves it
        if self._claims.shared:
            self._release(job.begin.key, name)
        self._post(ForImage(job.begin.key, Stored(name, stored.location, stored.digest)))
        log.info("image %s stored in %s: %s", job.begin.key, name, stored.location)

    def _guard(
        self, jobs: dict[ImageKey, _Job], job: _Job, lane: _Lane, step: Callable[[], None]
    ) -> None:
        """Run `step`; a permanent refusal fails the image, anything else is retried."""
        try:
            step()
        except PermanentError as exc:
            self._give_up(jobs, job, lane, ReasonCode.STORAGE_FAILED, str(exc))
        except DigestMismatchError as exc:
            lane.mismatches += 1
            if lane.mismatches >= self._verify_attempts:
                detail = f"{exc}; {lane.mismatches} writes, none read back as written"
                self._give_up(jobs, job, lane, ReasonCode.VERIFY_FAILED, detail)
            else:
                self._delay(job, lane, exc)
        except Exception as exc:
            self._delay(job, lane, exc)

    def _give_up(
        self, jobs: dict[ImageKey, _Job], job: _Job, lane: _Lane, reason: ReasonCode, detail: str
    ) -> None:
        key, name = job.begin.key, lane.backend.name
        self._attempt(lane, "failed")
        self._drop(jobs.pop(key, job))
        log.error("image %s: %s refused it: %s", key, name, detail)
        self._post(BackendHealth(name, detail))
        self._post(ForImage(key, StoreFailed(time.time(), name, reason, detail)))

    def _delay(self, job: _Job, lane: _Lane, exc: Exception) -> None:
        key, name = job.begin.key, lane.backend.name
        if lane.writer is not None:
            _quiet_abort(lane.writer)
        lane.writer = None
        lane.backoff = lane.backoff or Backoff(*self._retry)
        delay = lane.backoff.next_delay()
        lane.retry_at = time.monotonic() + delay
        detail = str(exc) or type(exc).__name__
        if not isinstance(exc, TilebridgeError):
            log.exception("image %s: %s failed unexpectedly; retrying", key, name)
            detail = f"{type(exc).__name__}: {detail}"
        log.warning("image %s: %s unavailable (%s); retrying in %.1f s", key, name, detail, delay)
        self._attempt(lane, "retry")
        self._post(BackendHealth(name, detail))
        self._post(ForImage(key, StoreDelayed(name, detail)))

    def _drop(self, job: _Job) -> None:
        _abort(job)
        if self._claims.shared:
            for name in job.lanes:
                self._release(job.begin.key, name)

    def _release(self, key: ImageKey, backend: str) -> None:
        try:
            self._claims.release(STORE, store_name(*key, backend))
        except TransientError as exc:  # it runs out by itself once we stop renewing
            log.warning("image %s: could not give up the %s store claim: %s", key, backend, exc)

    def _attempt(self, lane: _Lane, outcome: str) -> None:
        if lane.started:
            seconds = time.monotonic() - lane.started
            self._post(StoreAttempt(lane.backend.name, outcome, seconds, lane.nbytes))
        lane.started = 0.0


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

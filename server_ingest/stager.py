"""Staging I/O off the core thread, on named worker threads.

Chunk writes run on "ingest-stage-<n>": every chunk of one tile goes to the same writer, in
the order the core issued them; tiles spread over the writers by a hash of their key. Seals
(read back, digest, fdatasync, rename) and removals run on "ingest-seal-<n>", so a tile's
fsync never holds up the chunks of other tiles; a seal is issued only once the core has
heard that every chunk of its tile is written, so it can never overtake them. Each job's
outcome is posted back to the core as an event; nothing here decides anything or keeps state
between jobs. A fault never escapes a job: a full disk (`TransientError`) or any other error
becomes the event's `error`, and the device sends the data again later.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from server_ingest.events import (
    ChunkWritten,
    InboxItem,
    Seal,
    StagingDone,
    StagingSwept,
    TileRef,
    TileSealed,
)
from server_ingest.ledger.records import ImageKey
from server_ingest.staging import Staging
from tilebridge_protocol.errors import TilebridgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteChunk:
    ref: TileRef
    chunk_index: int
    offset: int
    data: bytes
    fresh: bool


@dataclass(frozen=True, slots=True)
class SealTile:
    ref: TileRef
    digest: bytes
    tile_bytes: int


@dataclass(frozen=True, slots=True)
class RemoveImage:
    key: ImageKey


@dataclass(frozen=True, slots=True)
class SweepKept:
    """Remove the staged copies of stored images (`retention`): every image folder but
    those of `keep` (the images the core holds) not written for `min_age_s`."""

    keep: frozenset[ImageKey]
    min_age_s: float


Job = WriteChunk | SealTile | RemoveImage | SweepKept


class Stager:
    def __init__(
        self, staging: Staging, post: Callable[[InboxItem], None], workers: int = 2
    ) -> None:
        self._staging = staging
        self._post = post
        self._writers: list[queue.SimpleQueue[Job | None]] = [
            queue.SimpleQueue() for _ in range(workers)
        ]
        self._sealers: list[queue.SimpleQueue[Job | None]] = [
            queue.SimpleQueue() for _ in range(workers)
        ]
        self._queues = self._writers + self._sealers
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"ingest-{kind}-{n}", daemon=True)
            for kind, queues in (("stage", self._writers), ("seal", self._sealers))
            for n, q in enumerate(queues)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Never blocks. The chunk writes of one tile keep their order."""
        if isinstance(job, RemoveImage):
            self._sealers[hash(job.key) % len(self._sealers)].put(job)
            return
        if isinstance(job, SweepKept):
            self._sealers[0].put(job)
            return
        lane = hash((job.ref.key, job.ref.tile))
        queues = self._writers if isinstance(job, WriteChunk) else self._sealers
        queues[lane % len(queues)].put(job)

    def _work(self, jobs: queue.SimpleQueue[Job | None]) -> None:
        while (job := jobs.get()) is not None:
            self._post(self._run(job))

    def _run(self, job: Job) -> InboxItem:
        s = self._staging
        if isinstance(job, RemoveImage):
            s.remove_image(job.key.device, job.key.image_id)
            return StagingDone(job.key)
        if isinstance(job, SweepKept):
            keep = frozenset((k.device, k.image_id) for k in job.keep)
            return StagingSwept(*s.sweep(keep, job.min_age_s))
        key, tile = job.ref.key, job.ref.tile
        if isinstance(job, WriteChunk):
            try:
                s.write_chunk(key.device, key.image_id, tile, job.offset, job.data, job.fresh)
            except Exception as exc:
                _note(exc, f"chunk of tile {tuple(tile)} of {key}")
                return ChunkWritten(job.ref, job.chunk_index, str(exc) or type(exc).__name__)
            return ChunkWritten(job.ref, job.chunk_index)
        try:
            sealed = s.seal(key.device, key.image_id, tile, job.digest, job.tile_bytes)
        except Exception as exc:
            _note(exc, f"sealing tile {tuple(tile)} of {key}")
            s.discard(key.device, key.image_id, tile)
            return TileSealed(job.ref, Seal.FAILED, str(exc) or type(exc).__name__)
        return TileSealed(job.ref, Seal.SEALED if sealed else Seal.MISMATCH)


def _note(exc: Exception, what: str) -> None:
    if isinstance(exc, TilebridgeError):
        log.error("%s not staged: %s", what, exc)
    else:  # a bug, or a fault nobody foresaw: the device resends, an admin reads this
        log.exception("%s not staged: unexpected error", what)

"""The local targets of one experiment: one thread each, fed from a byte budget.

A slow or failing target never holds up the camera, the server stream or the others: each
has its own queue and thread, and `put` blocks only when frames not yet written by every
target reach the budget. The ownership rule of `tilebridge_storage.base` is honoured: a
frame's bytes return to the budget when every target is done with them, which for a kind
that `keeps_references` is only when its image is finished or aborted.

A target that fails is recorded with what it lost and its partial output is removed (that
gives a full disk its space back); the others carry on. None of this touches the server
stream: a local failure is reported on the target, never raised to the acquisition.

A *live* target is one a viewer reads after every frame (ImSwitch's live view reads its
Zarr store as soon as `write_frame` returns): `put` hands back a `Landed` that the caller
waits on until every live target wrote the frame (or failed it), so the answer to a frame
can say the viewer will find it there. Closed with `Holdings` (a sparse or partial image),
every writer is told what the image holds before it finishes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_protocol.status import BackendProgress
from tilebridge_storage.base import Holdings, ImageWriter, StorageBackend

log = logging.getLogger(__name__)

FINISH, ABORT = "finish", "abort"
TargetState = Literal["writing", "finished", "failed"]


class Budget:
    """Bytes of frames held for the local targets of one experiment."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            # A frame bigger than the whole budget still goes, alone.
            while self.used and self.used + nbytes > self.limit:
                self._cond.wait()
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


class Landed:
    """Counts down as each live target is done with one frame (written, or failed)."""

    def __init__(self, targets: int) -> None:
        self._left = targets
        self._failed = False
        self._cond = threading.Condition()

    def done(self, ok: bool) -> None:
        with self._cond:
            self._left -= 1
            self._failed |= not ok
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """True once every live target wrote the frame; False if one failed it, or they
        did not within `timeout` s."""
        with self._cond:
            self._cond.wait_for(lambda: self._left <= 0, timeout)
            return self._left <= 0 and not self._failed


@dataclass(frozen=True)
class Close:
    """The end of a target's queue: finish (told what the image holds) or abort."""

    how: str
    holdings: Holdings | None = None


class SharedFrame:
    """One frame shared by every target; its bytes return to the budget when the last of
    them lets go."""

    def __init__(
        self,
        key: TileKey,
        pixels: np.ndarray[Any, Any],
        meta: PlaneMeta | None,
        refs: int,
        budget: Budget,
        landed: Landed | None = None,
    ) -> None:
        self.key, self.pixels, self.meta = key, pixels, meta
        self.landed = landed
        self._refs = refs
        self._budget = budget
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._budget.release(self.pixels.nbytes)


@dataclass
class Target:
    """One local target: its own thread writes it."""

    label: str
    make: Callable[[], StorageBackend]
    keeps_references: bool
    device: str
    manifest: OpenManifest
    on_done: Callable[[Target], None]
    show: Callable[[str], str] = str
    live: bool = False
    """A viewer reads it after every frame: `write_frame` answers once it has the frame."""
    state: TargetState = "writing"
    written: int = 0
    lost: int = 0
    error: str | None = None
    location: str | None = None
    total: int | None = None
    """Frames the image holds, once closed with fewer than its manifest's."""
    _queue: queue.SimpleQueue[SharedFrame | Close] = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"local-{self.label}", daemon=True)
        self._thread.start()

    def put(self, frame: SharedFrame) -> None:
        self._queue.put(frame)

    def close(self, how: str, holdings: Holdings | None = None) -> None:
        self._queue.put(Close(how, holdings))

    def join(self, timeout: float | None) -> bool:
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def progress(self) -> BackendProgress:
        return BackendProgress(
            image_id=self.manifest.image_id, state=self.state,
            frames_total=self.total or self.manifest.tile_count, frames_written=self.written,
            frames_lost=self.lost, error=self.error, location=self.location,
        )  # fmt: skip

    def _run(self) -> None:
        held: list[SharedFrame] = []  # frames a keeps-references backend may still read
        backend: StorageBackend | None = None
        writer: ImageWriter | None = None
        try:
            backend = self.make()
            writer = backend.open_image(self.device, self.manifest)
        except Exception as exc:
            self._fail(exc, None)
        while True:
            item = self._queue.get()
            if isinstance(item, Close):
                break
            ok = False
            try:
                if writer is None:
                    self.lost += 1
                else:
                    if item.meta is not None:
                        writer.add_planes({item.key: item.meta})
                    writer.write_tile(item.key, item.pixels)
                    self.written += 1
                    ok = True
            except Exception as exc:
                self.lost += 1
                self._fail(exc, writer)
                writer = None
            finally:
                if self.keeps_references and writer is not None:
                    held.append(item)
                else:
                    item.release()
                if self.live and item.landed is not None:
                    item.landed.done(ok)
        try:
            if writer is not None and item.how == FINISH:
                if item.holdings is not None:
                    self.total = len(item.holdings.tiles)
                    writer.expect(item.holdings)
                self.location = self.show(writer.finish().location)
                self.state = "finished"
            elif writer is not None:
                self._fail(None, writer)
        except Exception as exc:
            self._fail(exc, writer)
        finally:
            for frame in held:
                frame.release()
            if backend is not None:
                backend.close()
            self.on_done(self)

    def _fail(self, exc: Exception | None, writer: ImageWriter | None) -> None:
        self.error = "aborted" if exc is None else f"{type(exc).__name__}: {exc}"
        if exc is not None:
            log.error("%s failed after %d frames: %s", self.label, self.written, self.error)
        self.state = "failed"
        # What it wrote goes with its partial output: nothing of this image remains there.
        self.lost += self.written
        self.written = 0
        if writer is not None:
            try:
                writer.abort()
            except Exception:
                log.exception("%s: abort after failure", self.label)


class LocalTargets:
    """Every local target of one experiment, behind one budget."""

    def __init__(self, targets: list[Target], budget_bytes: int) -> None:
        self.targets = targets
        self.budget = Budget(budget_bytes)
        self.unbounded = Budget(1 << 62)
        """For mapped frames: the page cache holds them, not our memory."""
        for target in targets:
            target.start()

    def put(
        self,
        key: TileKey,
        pixels: np.ndarray[Any, Any],
        meta: PlaneMeta | None,
        mapped: Callable[[], np.ndarray[Any, Any]],
    ) -> Landed | None:
        """Queue a frame for every target (a failed one counts it lost on its own thread);
        blocks while the budget is full. A target that keeps references gets `mapped()`
        instead (a read-only map of the frame's spool file, which stays until the local
        targets are done): it may hold every frame of the image until finish, which would
        otherwise cost the whole image in memory. With live targets, the `Landed` to wait
        on until they have the frame."""
        copying = [t for t in self.targets if not t.keeps_references]
        keeping = [t for t in self.targets if t.keeps_references]
        live = sum(t.live for t in self.targets)
        landed = Landed(live) if live else None
        if copying:
            self.budget.acquire(pixels.nbytes)
            shared = SharedFrame(key, pixels, meta, len(copying), self.budget, landed)
            for target in copying:
                target.put(shared)
        if keeping:
            kept = SharedFrame(key, mapped(), meta, len(keeping), self.unbounded, landed)
            for target in keeping:
                target.put(kept)
        return landed

    def close(self, how: str, holdings: Holdings | None = None) -> None:
        for target in self.targets:
            target.close(how, holdings)

    def join(self, timeout: float | None) -> bool:
        return all([t.join(timeout) for t in self.targets])

    def progress(self) -> dict[str, BackendProgress]:
        return {t.label: t.progress() for t in self.targets}

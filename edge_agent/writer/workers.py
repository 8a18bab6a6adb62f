"""The local backends: one thread each, fed from a byte budget shared by all of them.

A slow or failing backend never holds up the camera or the others: each has its own queue
and thread, and `write_frame` blocks only when frames not yet written by every backend
reach the budget.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_agent.writer.config import SERVER, OMEWriterConfig
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.status import BackendProgress
from tilebridge_storage import registry
from tilebridge_storage.base import StorageBackend

log = logging.getLogger(__name__)

FINISH, ABORT = "finish", "abort"
"""How a worker is closed: finish its output, or discard it."""


def backend_factories(
    config: OMEWriterConfig, backends: Mapping[str, StorageBackend] | None
) -> dict[str, Callable[[], StorageBackend]]:
    """The enabled local backends, or `backends` instead of them (tests, custom storage)."""
    if backends is not None:
        return {name: _constant(backend) for name, backend in backends.items()}
    return {
        name: _importer(name, registry.folder_for(config.output_dir, name))
        for name in config.targets
        if name != SERVER
    }


def _constant(backend: StorageBackend) -> Callable[[], StorageBackend]:
    return lambda: backend


def _importer(name: str, folder: Path) -> Callable[[], StorageBackend]:
    # Made in the worker, so a backend that cannot load fails alone, like any other fault.
    return lambda: registry.create(name, folder=folder)


class Budget:
    """Bytes of frames held for the local backends."""

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


class SharedFrame:
    """One frame shared by every local worker; its bytes return to the budget when the
    last of them is done with it."""

    def __init__(self, key: TileKey, pixels: np.ndarray[Any, Any], refs: int, budget: Budget):
        self.key = key
        self.pixels = pixels
        self._refs = refs
        self._budget = budget
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._budget.release(self.pixels.nbytes)


class Worker:
    """Writes one local backend on its own thread."""

    def __init__(
        self, name: str, factory: Callable[[], StorageBackend], device: str, manifest: OpenManifest
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.state: Literal["writing", "finished", "failed"] = "writing"
        self.written = 0
        self.lost = 0
        self.error: str | None = None
        self.location: str | None = None
        self._counts = threading.Lock()
        self._queue: queue.SimpleQueue[SharedFrame | str] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(factory, device), name=f"omewriter-{name}", daemon=True
        )
        self._thread.start()

    def put(self, frame: SharedFrame) -> None:
        self._queue.put(frame)

    def count_lost(self) -> None:
        with self._counts:
            self.lost += 1

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def close(self, how: str) -> None:
        self._queue.put(how)

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def progress(self) -> BackendProgress:
        return BackendProgress(
            image_id=self.manifest.image_id, state=self.state,
            frames_total=self.manifest.tile_count, frames_written=self.written,
            frames_lost=self.lost, error=self.error, location=self.location,
        )  # fmt: skip

    def _run(self, factory: Callable[[], StorageBackend], device: str) -> None:
        backend = writer = None
        try:
            backend = factory()
            writer = backend.open_image(device, self.manifest)
        except Exception as exc:
            self._fail(exc, None)
        while True:
            item = self._queue.get()
            if isinstance(item, str):
                break
            try:
                if writer is None:
                    self.count_lost()
                else:
                    writer.write_tile(item.key, item.pixels)
                    self.written += 1
            except Exception as exc:
                self.count_lost()
                self._fail(exc, writer)
                writer = None
            finally:
                item.release()
        try:
            if writer is not None and item == FINISH:
                self.location = writer.finish().location
                self.state = "finished"
            elif writer is not None:
                self._fail(None, writer)
        except Exception as exc:
            self._fail(exc, writer)
        finally:
            if backend is not None:
                backend.close()

    def _fail(self, exc: Exception | None, writer: Any) -> None:
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("%s failed after %d frames: %s", self.name, self.written, self.error)
        else:
            self.error = "aborted"
        self.state = "failed"
        # What it wrote goes with its partial output: nothing of this image remains there.
        with self._counts:
            self.lost += self.written
            self.written = 0
        if writer is not None:
            try:
                writer.abort()
            except Exception:
                log.exception("%s: abort after failure", self.name)

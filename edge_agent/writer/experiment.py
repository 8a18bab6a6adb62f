"""One acquisition: frames handed to the server stream and the local workers, and the
progress of every target."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.agent import EdgeAgent
from edge_agent.writer.config import SERVER, OMEWriterConfig
from edge_agent.writer.frames import FrameInfo, FrameMatcher
from edge_agent.writer.workers import ABORT, FINISH, Budget, SharedFrame, Worker
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import ImageState, OpenManifest
from tilebridge_protocol.status import BackendProgress
from tilebridge_storage.base import StorageBackend

log = logging.getLogger(__name__)

State = Literal["acquiring", "finalizing", "finalized", "aborted"]


class ExperimentProgress(BaseModel):
    model_config = ConfigDict(frozen=True)

    image_id: UUID
    experiment: str
    image_name: str
    state: State
    frames_total: int
    frames_received: int
    backends: dict[str, BackendProgress]
    """Per target: frames written (for `omero`, acknowledged by the server), failures."""
    warnings: list[str] = Field(default_factory=list)


class Experiment:
    def __init__(
        self,
        agent: EdgeAgent,
        config: OMEWriterConfig,
        manifest: OpenManifest,
        factories: Mapping[str, Callable[[], StorageBackend]],
    ) -> None:
        self.agent = agent
        self.manifest = manifest
        self.state: State = "acquiring"
        self.received: set[TileKey] = set()
        self.matcher = FrameMatcher(manifest)
        self.to_server = config.write_omero
        self.server_handed = 0
        self.server_lost = 0
        self.server_error: str | None = None
        self._lock = threading.Lock()
        self._budget = Budget(config.max_bytes_in_flight)
        if self.to_server:
            try:
                agent.open_image(manifest)
            except PermanentError:
                raise  # e.g. this image_id was opened with another manifest: the caller's error
            except Exception as exc:
                self._server_failed(exc)
        device = agent.device
        self.workers = [Worker(n, f, device, manifest) for n, f in factories.items()]

    def key(self, info: FrameInfo) -> TileKey:
        return self.matcher.key(info)

    def write(self, frame: np.ndarray[Any, Any], info: FrameInfo, owned: bool) -> bool:
        with self._lock:
            if self.state != "acquiring":
                raise PermanentError(
                    f"experiment {self.manifest.experiment} is {self.state}; no more frames"
                )
            key = self.matcher.key(info)
            if key in self.received:
                return False
            # Workers read it later; the camera may reuse its buffer as soon as we return.
            pixels = self.matcher.pixels(frame, copy_shared=not owned and bool(self.workers))
            live = [w for w in self.workers if w.state == "writing"]
            for w in self.workers:
                if w not in live:
                    w.count_lost()
            if live:
                self._budget.acquire(pixels.nbytes)
                shared = SharedFrame(key, pixels, len(live), self._budget)
                for w in live:
                    w.put(shared)
            if self.to_server and self.server_error is None:
                try:
                    self.agent.write_tile(self.manifest.image_id, key, pixels)
                    self.server_handed += 1
                except Exception as exc:
                    self.server_lost += 1
                    self._server_failed(exc)
            elif self.to_server:
                self.server_lost += 1
            self.received.add(key)
            return True

    def finalize(self, timeout: float | None) -> None:
        with self._lock:
            if self.state == "acquiring":
                missing = [k for k in self.manifest.tile_keys() if k not in self.received]
                if missing:
                    k = missing[0]
                    raise PermanentError(
                        f"cannot finalize {self.manifest.experiment}: {len(missing)} of "
                        f"{self.manifest.tile_count} frames not written (first: tile_index="
                        f"{k.index} z_index={k.z} channel_index={k.c} time_index={k.t})"
                    )
                self.state = "finalizing"
                if self.to_server and self.server_error is None:
                    try:
                        self.agent.finalize(self.manifest.image_id)
                    except Exception as exc:
                        self._server_failed(exc)
                for w in self.workers:
                    w.close(FINISH)
            elif self.state != "finalizing":
                return
        if all([w.join(timeout) for w in self.workers]):
            self.state = "finalized"

    def abort(self) -> None:
        with self._lock:
            if self.state in ("acquiring", "finalizing"):
                self.state = "aborted"
                for w in self.workers:
                    w.close(ABORT)

    def progress(self) -> ExperimentProgress:
        backends = {w.name: w.progress() for w in self.workers}
        if self.to_server:
            backends[SERVER] = self._server_progress()
        state = self.state
        if state == "finalizing" and all(w.done for w in self.workers):
            state = "finalized"
        return ExperimentProgress(
            image_id=self.manifest.image_id, experiment=self.manifest.experiment,
            image_name=self.manifest.image_name, state=state,
            frames_total=self.manifest.tile_count, frames_received=len(self.received),
            backends=backends, warnings=list(self.matcher.warnings),
        )  # fmt: skip

    def _server_progress(self) -> BackendProgress:
        image_id = self.manifest.image_id
        ack = self.agent.wait_done([image_id], 0).get(image_id)
        buffer = self.agent.buffer
        pending = _count(buffer.images_dir / str(image_id) / "tiles", ".tile")
        rejected = _count(buffer.rejected_dir / str(image_id), ".tile")
        acked = max(0, self.server_handed - pending - rejected)
        state: Literal["writing", "finished", "failed"] = "writing"
        error, location = self.server_error, None
        if ack is not None and ack.state is ImageState.COMPLETE:
            state, acked = "finished", self.manifest.tile_count
            location = "; ".join(f"{k}: {v}" for k, v in sorted(ack.locations.items()))
        elif ack is not None:
            state, error = "failed", f"server: {ack.reason}: {ack.detail}"
        elif self.server_error is not None:
            state = "failed"
        return BackendProgress(
            image_id=image_id, state=state, frames_total=self.manifest.tile_count,
            frames_written=acked, frames_lost=self.server_lost + rejected, error=error,
            location=location,
        )  # fmt: skip

    def _server_failed(self, exc: Exception) -> None:
        self.server_error = f"{type(exc).__name__}: {exc}"
        log.error("server stream of %s failed: %s", self.manifest.image_id, self.server_error)


def _count(folder: Path, suffix: str) -> int:
    try:
        return sum(1 for entry in os.scandir(folder) if entry.name.endswith(suffix))
    except FileNotFoundError:
        return 0

"""The in-memory side of the experiments being written: per experiment its frame matcher,
its local targets and their confined folders, and a count of frames being written (so a
finalize waits for them and no frame slips in after the close). Made once per experiment
(a second caller waits for the first), replayed from the spool after a restart, dropped
when its local targets are done. Its locks guard dicts and counters only, never I/O."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from uuid import UUID

import numpy as np

from edge_agent.config import OMEWriterConfig
from edge_agent.confine import ConfinedDir, open_confined
from edge_agent.frames import FrameMatcher
from edge_agent.localtargets import FINISH, LocalTargets, Target
from edge_agent.models import ExperimentSpec, LocalTarget
from edge_agent.settings import AgentSettings
from edge_agent.spool import ImageRow, Spool
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import decode_close
from tilebridge_storage import registry
from tilebridge_storage.base import Holdings, StorageBackend

log = logging.getLogger(__name__)

MakeBackend = Callable[[LocalTarget, ConfinedDir], StorageBackend]


def registry_backend(target: LocalTarget, folder: ConfinedDir) -> StorageBackend:
    kind = registry.kind(target.kind)
    if kind.needs != "folder":
        raise PermanentError(f"{target.kind} is not a local file target")
    make: Callable[..., StorageBackend] = kind.load()
    try:
        return make(folder.path, name=target.label, **target.options)
    except TypeError as exc:
        raise PermanentError(f"target {target.label}: options {target.options}: {exc}") from exc


class Live:
    """The in-memory side of one experiment (see the module docstring)."""

    def __init__(self, manifest_row: ImageRow, frames: int) -> None:
        self.row = manifest_row
        self.matcher = FrameMatcher(manifest_row.manifest)
        self.targets: LocalTargets | None = None
        self.dirs: list[ConfinedDir] = []
        self.frames = frames
        self.closing = False
        self._writing = 0
        self._cond = threading.Condition()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            if self.closing:
                raise PermanentError(f"experiment {self.row.image_id} is closing; no more frames")
            self._writing += 1
        try:
            yield
        finally:
            with self._cond:
                self._writing -= 1
                self._cond.notify_all()

    def close_gate(self) -> None:
        """No new frame from now on; wait for those in progress."""
        with self._cond:
            self.closing = True
            while self._writing:
                self._cond.wait()

    def reopen(self) -> None:
        """The close was refused (frames missing): frames may come again."""
        with self._cond:
            self.closing = False

    def count(self) -> int:
        with self._cond:
            self.frames += 1
            return self.frames


class LiveExperiments:
    def __init__(
        self,
        spool: Spool,
        settings: AgentSettings,
        defaults: Callable[[], OMEWriterConfig],
        make_backend: MakeBackend,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.defaults = defaults
        self.make_backend = make_backend
        self._lock = threading.Lock()  # guards the dicts below, never I/O
        self._live: dict[UUID, Live] = {}
        self._making: dict[UUID, threading.Event] = {}

    def get(self, image_id: UUID) -> Live | None:
        with self._lock:
            return self._live.get(image_id)

    def open_dirs(self, spec: ExperimentSpec) -> list[ConfinedDir]:
        dirs: list[ConfinedDir] = []
        try:
            for target in spec.targets or []:
                dirs.append(open_confined(self.settings.local_output_root, target.folder))
        except BaseException:
            close_all(dirs)
            raise
        return dirs

    def ensure(self, row: ImageRow, dirs: list[ConfinedDir] | None = None) -> Live:
        """The experiment's Live, made once (a second caller waits for the first)."""
        image_id = row.image_id
        while True:
            with self._lock:
                live = self._live.get(image_id)
                if live is not None:
                    if dirs:
                        close_all(dirs)
                    return live
                busy = self._making.get(image_id)
                if busy is None:
                    mine = self._making[image_id] = threading.Event()
                    break
            busy.wait()
        try:
            if row.state not in ("acquiring", "finalizing"):
                raise PermanentError(f"experiment {image_id} is {row.state}; no more frames")
            live = self._make_live(row, dirs)
            with self._lock:
                self._live[image_id] = live
        finally:
            with self._lock:
                del self._making[image_id]
            mine.set()
        return live

    def _make_live(self, row: ImageRow, dirs: list[ConfinedDir] | None) -> Live:
        counts = self.spool.counts(row.image_id)
        live = Live(row, counts.accepted)
        spec = ExperimentSpec.model_validate(row.record["spec"])
        pending = {label for label in (t.label for t in spec.targets or [])} - set(row.targets)
        if not pending:
            return live
        live.dirs = dirs if dirs is not None else self.open_dirs(spec)
        targets = []
        for target, folder in zip(spec.targets or [], live.dirs, strict=True):
            if target.label not in pending:
                continue
            targets.append(
                Target(
                    label=target.label,
                    make=partial(self.make_backend, target, folder),
                    keeps_references=registry.kind(target.kind).keeps_references,
                    device=self.settings.device_id,
                    manifest=row.manifest,
                    on_done=partial(self._target_done, row.image_id),
                    show=folder.shown,
                    live=target.live,
                )
            )
        budget = min(
            self.defaults().max_bytes_in_flight, self.settings.acquisition_memory_bytes // 2
        )
        live.targets = LocalTargets(targets, budget)
        if counts.accepted:  # after a restart: write them again from the spool
            threading.Thread(
                target=self._replay, args=(live,), name=f"replay-{row.image_id}", daemon=True
            ).start()
        elif row.state == "finalizing":
            self._finish(live)
        return live

    def _replay(self, live: Live) -> None:
        image_id = live.row.image_id
        assert live.targets is not None
        for key, meta in self.spool.accepted_tiles(image_id).items():
            try:
                pixels = self.mapped(live, key)
            except FileNotFoundError:
                continue  # the targets report the tile missing at finish
            live.targets.put(key, pixels, meta, partial(self.mapped, live, key))
        log.info("experiment %s: local targets fed again from the spool", image_id)
        if live.row.state == "finalizing":  # closed before the restart: finish after the frames
            self._finish(live)

    def _finish(self, live: Live) -> None:
        """Finish the targets of an experiment that was closed before the agent restarted,
        told what the image holds (its close)."""
        row, targets = live.row, live.targets
        assert targets is not None and row.close is not None
        targets.close(FINISH, Holdings.of(row.manifest, decode_close(row.close)))

    def mapped(self, live: Live, key: TileKey) -> np.ndarray[Any, Any]:
        """A read-only map of the frame's spool file (kept while local targets need it)."""
        m = live.row.manifest
        path = self.spool.tile_path(m.image_id, key)
        shape = (m.tile_height, m.tile_width)
        return np.memmap(path, dtype=m.dtype.numpy, mode="r", shape=shape)

    def _target_done(self, image_id: UUID, target: Target) -> None:
        progress = target.progress().model_dump(mode="json")
        try:
            self.spool.set_target(image_id, target.label, progress)
            with self._lock:
                live = self._live.get(image_id)
            if live is None or live.targets is None:
                return
            if all(t.state != "writing" for t in live.targets.targets):
                self.spool.release_local(image_id)
                if self.spool.image(image_id).state == "finalizing":
                    self.spool.set_state(image_id, "finalized")
                close_all(live.dirs)
                self.forget(image_id)
        except (PermanentError, TransientError):
            log.exception("recording local target %s of %s", target.label, image_id)

    def forget(self, image_id: UUID) -> None:
        with self._lock:
            self._live.pop(image_id, None)


def close_all(dirs: list[ConfinedDir]) -> None:
    for folder in dirs:
        folder.close()

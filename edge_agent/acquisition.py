"""The one front door: every way in (the Python API, the fast local path, the HTTP API)
calls `Acquisition`, so every caller gets the same answers and the same errors.

The durable spool is the primary path: a frame is accepted when the spool says so, and the
spool's refusals reach the caller as they are (`TransientError` for a full disk, a
`ConflictError` for a repeat with other pixels, `PermanentError` for a frame that does not
fit). Local targets fan out from it behind a byte budget; their failures are theirs
(reported on the target, never raised to the camera, never touching the server stream).

Concurrency: any thread may call. The spool is the state's owner (SQLite serializes its
writers); `Live` is the in-memory part of an experiment that is acquiring or finishing
(frame matcher, local targets, confined folders, a count of frames being written, so that
finalize waits for writes in progress and no frame slips in after the close). Its lock
guards counters only, never I/O.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import numpy as np

from edge_agent.config import OMEWriterConfig
from edge_agent.errors import ConflictError, UnknownExperimentError
from edge_agent.live import Live, LiveExperiments, MakeBackend, close_all, registry_backend
from edge_agent.localtargets import ABORT, FINISH
from edge_agent.models import (
    ExperimentProgress,
    ExperimentSpec,
    FrameInfo,
    FrameResult,
    StartedExperiment,
)
from edge_agent.problems import Problems
from edge_agent.progress import progress_of
from edge_agent.settings import Abandoned, AgentSettings
from edge_agent.spool import ImageRow, Spool
from tilebridge_protocol.errors import PermanentError, TilebridgeError, TransientError
from tilebridge_protocol.messages import utcnow
from tilebridge_storage import registry
from tilebridge_storage.base import Holdings

log = logging.getLogger(__name__)

LIVE_WAIT_S = 10.0
"""Longest a frame's answer waits for the live targets (then `landed` is False): a stuck
disk must not stop the camera, whose frame is safe in the spool already."""
MAX_FRAMES_PER_EXPERIMENT = 50_000
"""An experiment's close manifest must fit in one message the ingest accepts: compressed,
a tile with its PlaneMeta takes ~67 bytes of the 4 MiB (`MAX_JSON_BYTES`), so ~60k fit
(docs/protocol.md); this keeps a margin."""


class Acquisition:
    def __init__(
        self,
        spool: Spool,
        settings: AgentSettings,
        defaults: Callable[[], OMEWriterConfig],
        make_backend: MakeBackend = registry_backend,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.defaults = defaults
        self.make_backend = make_backend
        self.live = LiveExperiments(spool, settings, defaults, make_backend)
        self._answered = threading.Condition()
        self.problems = Problems()
        """The last refusal of the spool (a full disk, a frame that does not fit), shown on
        the device status until a call succeeds again."""

    # -- the front door ---------------------------------------------------------------------

    def start(self, spec: ExperimentSpec | Mapping[str, Any]) -> StartedExperiment:
        with self._reporting("starting an experiment"):
            return self._start(_spec(spec))

    def _start(self, spec: ExperimentSpec) -> StartedExperiment:
        if spec.image_id is not None:
            with suppress(UnknownExperimentError):
                return self._resume(self.spool.image(spec.image_id), spec)
        resolved = self._resolve(spec)
        manifest = resolved.manifest()
        record = {"spec": resolved.model_dump(mode="json")}
        to_server, targets = bool(resolved.server), bool(resolved.targets)
        dirs = self.live.open_dirs(resolved)  # refused before anything is stored
        try:
            created = self.spool.create(manifest, record, to_server, local_hold=targets)
        except BaseException:
            close_all(dirs)
            raise
        if not created:  # another call created it meanwhile
            close_all(dirs)
            return self._resume(self.spool.image(manifest.image_id), spec)
        row = self.spool.image(manifest.image_id)
        self.live.ensure(row, dirs)
        log.info("experiment %s started: image %s", resolved.experiment, manifest.image_id)
        return _started(row, resolved, resumed=False, frames=0)

    def write_frame(
        self,
        image_id: UUID,
        frame: np.ndarray[Any, Any],
        metadata: FrameInfo | Mapping[str, Any] | None = None,
        *,
        owned: bool = False,
        **fields: Any,
    ) -> FrameResult:
        """See `FrontDoor.write_frame`. `owned=True`: the caller never touches `frame` again
        (saves the copy the local targets would otherwise need)."""
        with self._reporting(f"frame of {image_id}"):
            return self._write_frame(image_id, frame, _frame_info(metadata, fields), owned)

    def _write_frame(
        self, image_id: UUID, frame: np.ndarray[Any, Any], info: FrameInfo, owned: bool
    ) -> FrameResult:
        live = self.live.get(image_id)
        if live is None:
            live = self.live.ensure(self._row(image_id))
        key = live.matcher.key(info)
        pixels = live.matcher.pixels(frame, copy_shared=not owned and live.targets is not None)
        meta = info.plane(live.row.manifest.acquired_at)
        landed = None
        with live.writing():
            accepted = self.spool.add_tile(image_id, key, pixels.data.cast("B"), meta)
            if accepted and live.targets is not None:
                mapped = functools.partial(self.live.mapped, live, key)
                waiting = live.targets.put(key, pixels, meta, mapped)
                landed = None if waiting is None else waiting.wait(LIVE_WAIT_S)
        if accepted:
            return FrameResult(
                accepted=True, tile=tuple(key), frames_received=live.count(), landed=landed
            )
        before = self.spool.accepted_digest(image_id, key)
        when = datetime.fromtimestamp(before[1], UTC).isoformat() if before else "before"
        return FrameResult(
            accepted=False, reason=f"frame {tuple(key)} was accepted at {when}; nothing changed",
            tile=tuple(key), frames_received=live.frames,
        )  # fmt: skip

    def finalize(
        self,
        image_id: UUID,
        *,
        partial: bool = False,
        not_planned: Sequence[int] = (),
        timeout: float | None = None,
        ended_by: str | None = None,
    ) -> ExperimentProgress:
        row = self._row(image_id)
        if row.state == "acquiring":
            live = self.live.ensure(row)
            live.close_gate()
            try:
                close = self.spool.close_image(
                    image_id, partial=partial, not_planned=not_planned, ended_by=ended_by
                )
            except BaseException:
                live.reopen()
                raise
            if live.targets is None:
                self.live.forget(image_id)
            elif close is None:
                live.targets.close(ABORT)
            else:
                live.targets.close(FINISH, Holdings.of(row.manifest, close))
            log.info(
                "experiment %s closed%s", image_id, " (partial)" if close and close.partial else ""
            )
        live_now = self.live.get(image_id)
        if live_now is not None and live_now.targets is not None:
            live_now.targets.join(timeout)
        return self.experiment(image_id)

    def abort(self, image_id: UUID, *, ended_by: str | None = None) -> ExperimentProgress:
        row = self._row(image_id)
        if row.state in ("acquiring", "finalizing"):
            live = self.live.ensure(row)
            live.close_gate()
            self.spool.abort(image_id, ended_by)
            if live.targets is not None:
                live.targets.close(ABORT)
                live.targets.join(60)
            self.live.forget(image_id)
            log.info("experiment %s aborted%s", image_id, f" ({ended_by})" if ended_by else "")
        return self.experiment(image_id)

    def experiment(self, image_id: UUID) -> ExperimentProgress:
        row = self._row(image_id)
        live = self.live.get(image_id)
        return self._progress(row, live)

    def experiments(self) -> list[ExperimentProgress]:
        out = []
        for row in self.spool.images():
            live = self.live.get(row.image_id)
            out.append(self._progress(row, live))
        return out

    def _progress(self, row: ImageRow, live: Live | None) -> ExperimentProgress:
        counts = self.spool.counts(row.image_id)
        if live is None:
            return progress_of(row, counts)
        return progress_of(row, counts, live.targets, live.matcher.warnings)

    @contextmanager
    def _reporting(self, what: str) -> Iterator[None]:
        try:
            yield
        except TilebridgeError as exc:
            self.problems.set("acquisition", f"{what}: {exc}")
            raise
        self.problems.clear("acquisition")

    # -- the server's answers and waiting for them -----------------------------------------

    def server_answered(self, image_id: UUID) -> None:
        """Called (by the publisher's owner) once the server answered the image."""
        with self._answered:
            self._answered.notify_all()

    def wait_done(self, image_id: UUID, timeout: float) -> ExperimentProgress:
        """Block until the server answered the image (complete, failed or refused)."""
        deadline = time.monotonic() + timeout
        with self._answered:
            while True:
                progress = self.experiment(image_id)
                remaining = deadline - time.monotonic()
                if progress.server not in ("sending",) or remaining <= 0:
                    return progress
                self._answered.wait(min(remaining, 0.5))

    # -- housekeeping (the reporter thread calls these) -------------------------------------

    def recover(self) -> None:
        """At start-up: local targets of unfinished experiments are written again from the
        spool's tiles (their partial output from before the restart is replaced); those of
        an experiment closed before are finished after its frames (`LiveExperiments`)."""
        for row in self.spool.images(unfinished=True):
            if row.local_hold and row.state in ("acquiring", "finalizing"):
                self.live.ensure(row)

    def end_abandoned(self, now: float | None = None) -> list[UUID]:
        policy = self.settings.abandoned
        if policy.action is Abandoned.KEEP:
            return []
        now = time.time() if now is None else now
        ended = []
        for row in self.spool.images(unfinished=True):
            idle = now - (row.last_frame_at or row.started_at)
            if row.state != "acquiring" or idle < policy.after_s:
                continue
            why = f"abandoned after {idle / 3600:.1f} h idle"
            log.warning("experiment %s %s: %s", row.image_id, why, policy.action.value)
            try:
                if policy.action is Abandoned.PARTIAL:
                    self.finalize(row.image_id, partial=True, timeout=0, ended_by=why)
                else:
                    self.abort(row.image_id, ended_by=why)
            except (PermanentError, TransientError) as exc:
                log.error("ending abandoned experiment %s: %s", row.image_id, exc)
                continue
            ended.append(row.image_id)
        return ended

    # -- internals --------------------------------------------------------------------------

    def _row(self, image_id: UUID) -> ImageRow:
        return self.spool.image(image_id)

    def _resume(self, row: ImageRow, spec: ExperimentSpec) -> StartedExperiment:
        stored = ExperimentSpec.model_validate(row.record["spec"])
        for name in sorted(spec.model_fields_set - {"image_id"}):
            given, kept = getattr(spec, name), getattr(stored, name)
            if given != kept:
                raise ConflictError(
                    name, f"experiment {row.image_id} was started with {_show(kept)}, "
                    f"this start gives {_show(given)}; leave it out to resume",
                )  # fmt: skip
        frames = self.spool.counts(row.image_id).accepted
        if row.state == "acquiring":
            self.live.ensure(row)
        return _started(row, stored, resumed=True, frames=frames)

    def _resolve(self, spec: ExperimentSpec) -> ExperimentSpec:
        config = self.defaults()
        resolved = spec.model_copy(
            update={
                "image_id": spec.image_id or uuid4(),
                "acquired_at": spec.acquired_at or utcnow(),
                "project": spec.project or config.omero_project,
                "dataset": spec.dataset or config.omero_dataset,
                "layout": spec.layout or config.layout,
                "image_name": spec.image_name or spec.experiment,
                "targets": config.local_targets() if spec.targets is None else spec.targets,
                "server": config.write_omero if spec.server is None else spec.server,
            }
        )
        resolved = ExperimentSpec.model_validate(resolved.model_dump())  # re-check it whole
        if not resolved.targets and not resolved.server:
            raise PermanentError("targets is empty and server is false: nothing to write")
        limit = self.settings.max_frame_bytes
        if resolved.tile_bytes > limit:
            raise PermanentError(
                f"tile_width x tile_height: a frame of {resolved.tile_bytes} bytes is more than "
                f"{limit} (a quarter of acquisition_memory_bytes)"
            )
        if resolved.frame_count > MAX_FRAMES_PER_EXPERIMENT:
            raise PermanentError(
                f"size: {resolved.frame_count} frames in one experiment, at most "
                f"{MAX_FRAMES_PER_EXPERIMENT} (its close manifest must fit one message)"
            )
        for target in resolved.targets or []:
            kind = registry.kind(target.kind)
            if kind.needs != "folder":
                raise PermanentError(f"targets: {target.kind} is not a local file target")
            if kind.mosaic_only and resolved.layout != "mosaic":
                raise PermanentError(f"targets: {target.kind} needs layout mosaic")
            try:  # options are the backend's keyword arguments: refused now, not later
                inspect.signature(kind.load()).bind(target.folder, name=target.label,
                                                    **target.options)  # fmt: skip
            except TypeError as exc:
                raise PermanentError(f"targets: {target.label} options: {exc}") from None
        return resolved


def _spec(spec: ExperimentSpec | Mapping[str, Any]) -> ExperimentSpec:
    return spec if isinstance(spec, ExperimentSpec) else ExperimentSpec.model_validate(dict(spec))


def _frame_info(
    metadata: FrameInfo | Mapping[str, Any] | None, fields: dict[str, Any]
) -> FrameInfo:
    if isinstance(metadata, FrameInfo):
        return FrameInfo.of(metadata, **fields)
    return FrameInfo.of(dict(metadata or {}), **fields)


def _started(row: ImageRow, spec: ExperimentSpec, resumed: bool, frames: int) -> StartedExperiment:
    m = row.manifest
    return StartedExperiment(
        image_id=m.image_id, resumed=resumed, spec=spec, experiment=m.experiment,
        acquired_at=m.acquired_at, state=row.state, frames_total=m.tile_count,
        frames_received=frames, tile_width=m.tile_width, tile_height=m.tile_height,
        dtype=m.dtype, tile_bytes=m.tile_bytes, positions=list(m.positions),
    )  # fmt: skip


def _show(value: Any) -> str:
    text = repr(value.isoformat() if isinstance(value, datetime) else value)
    return text if len(text) < 120 else text[:117] + "..."

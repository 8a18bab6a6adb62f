"""An experiment's progress per target, from one source: the spool's own records of the
image (frames accepted, committed, rejected; the server's answer; local targets' final
states), plus the live targets of an experiment still being written."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

from edge_agent.localtargets import LocalTargets
from edge_agent.models import SERVER, ExperimentProgress, ExperimentSpec
from edge_agent.spool import Counts, ImageRow
from tilebridge_protocol.status import BackendProgress, ExperimentSummary


def progress_of(
    row: ImageRow,
    counts: Counts,
    targets: LocalTargets | None = None,
    warnings: list[str] | None = None,
) -> ExperimentProgress:
    m = row.manifest
    spec = ExperimentSpec.model_validate(row.record["spec"])
    backends: dict[str, BackendProgress] = {}
    running = targets.progress() if targets is not None else {}
    for target in spec.targets or []:
        label = target.label
        if label in running:
            backends[label] = running[label]
        elif label in row.targets:
            backends[label] = BackendProgress.model_validate(row.targets[label])
        else:  # never made here (aborted before), or waiting for the agent to resume it
            state: Literal["writing", "failed"] = "failed" if row.state == "aborted" else "writing"
            backends[label] = BackendProgress(
                image_id=m.image_id, state=state, frames_total=m.tile_count, frames_written=0,
                error="aborted" if state == "failed" else None,
            )  # fmt: skip
    if row.to_server:
        backends[SERVER] = _server(row, counts)
    return ExperimentProgress(
        image_id=m.image_id, experiment=m.experiment, image_name=m.image_name,
        state=row.state, partial=row.partial, ended_by=row.ended_by,
        frames_total=m.tile_count, frames_received=counts.accepted, server=row.server,
        locations=dict(row.locations),
        backends=backends, warnings=list(warnings or []),
        started_at=datetime.fromtimestamp(row.started_at, UTC),
        last_frame_at=_at(row.last_frame_at),
    )  # fmt: skip


def _server(row: ImageRow, counts: Counts) -> BackendProgress:
    m = row.manifest
    state: Literal["writing", "finished", "failed"] = "writing"
    error = location = None
    if row.server == "complete":
        state = "finished"
        location = "; ".join(f"{k}: {v}" for k, v in sorted(row.locations.items()))
    elif row.server in ("failed", "refused"):
        state = "failed"
        error = f"server {'refused the image' if row.server == 'refused' else 'failed'}: "
        error += row.server_detail or ""
    return BackendProgress(
        image_id=m.image_id, state=state, frames_total=m.tile_count,
        frames_written=counts.committed, frames_lost=counts.rejected, error=error,
        location=location,
    )  # fmt: skip


def summary_of(progress: ExperimentProgress, now: float | None = None) -> ExperimentSummary:
    """The short form the device status topic carries."""
    now = time.time() if now is None else now
    last = progress.last_frame_at or progress.started_at
    return ExperimentSummary(
        image_id=progress.image_id, experiment=progress.experiment, state=progress.state,
        partial=progress.partial, ended_by=progress.ended_by,
        frames_total=progress.frames_total, frames_received=progress.frames_received,
        server=progress.server, idle_s=max(0.0, now - last.timestamp()),
    )  # fmt: skip


def _at(stamp: float | None) -> datetime | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC)

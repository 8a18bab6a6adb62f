"""The one front door of the edge, as a type: what an acquisition program calls.

Two implementations, same behaviour, same answers and same errors:

* `edge_agent.acquisition.Acquisition`, in the agent's process (the Python API; the HTTP API
  and the fast path call it);
* `edge_agent.fastpath_client.FastPathClient`, in the acquisition program's process, talking
  to a running `edge-agent run` over its local socket (what the ImSwitch adapter uses).

Errors (see `edge_agent.errors`): `TransientError` (the spool's disk is full, the agent is
restarting: nothing was accepted, try again), `ConflictError` (409: contradicts what was
accepted before, `field` says what), `UnknownExperimentError` (404), `PermanentError` (422: the
request can never succeed as it is; the message says why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

import numpy as np

from edge_agent.models import (
    ExperimentProgress,
    ExperimentSpec,
    FrameInfo,
    FrameResult,
    StartedExperiment,
)


class FrontDoor(Protocol):
    def start(self, spec: ExperimentSpec | Mapping[str, Any]) -> StartedExperiment:
        """Open an experiment (one image) on every target, or resume it: starting again with
        the same `image_id` is idempotent; the stored spec is authoritative and returned
        whole; a given field that differs from it is a `ConflictError` naming it."""
        ...

    def write_frame(
        self,
        image_id: UUID,
        frame: np.ndarray[Any, Any],
        metadata: FrameInfo | Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> FrameResult:
        """Make one frame durable in the agent's spool and hand it to the local targets.

        Returns once the frame is an fsynced file plus a committed record (a kill -9 of the
        agent after this returns loses nothing); never waits on the network. A repeat of an
        accepted frame answers `accepted=False` with the reason; a repeat with other pixels
        is a `ConflictError` (`field="pixels"`) and changes nothing."""
        ...

    def finalize(
        self,
        image_id: UUID,
        *,
        partial: bool = False,
        not_planned: Sequence[int] = (),
        timeout: float | None = None,
    ) -> ExperimentProgress:
        """Close the experiment: the server stream gets its close manifest, the local
        targets finish their files (waited for up to `timeout` s; None: wait for good).
        Without `partial`, every frame must have been accepted (422 names the first
        missing one); with it, the image is closed with the frames it has and the server
        marks it incomplete. `not_planned`: positions the scan never planned (a round or
        oval area's empty grid cells); they hold no frame and are not missing, so the image
        is complete without them (a sparse image). Calling it again answers the same and
        changes nothing."""
        ...

    def abort(self, image_id: UUID) -> ExperimentProgress:
        """Discard the experiment on the Pi: local partial output is removed and frames not
        yet sent are dropped. Frames the server already has are expired there (never
        closed); use `finalize(partial=True)` to keep them as an incomplete image instead."""
        ...

    def experiment(self, image_id: UUID) -> ExperimentProgress:
        """The experiment's progress per target (answers after agent restarts)."""
        ...

    def experiments(self) -> list[ExperimentProgress]:
        """Every experiment the agent still knows, newest first."""
        ...

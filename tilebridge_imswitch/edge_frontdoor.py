"""The port over the edge's one front door (`edge_agent.frontdoor.FrontDoor`): the fast-path
client to a running `edge-agent run` (`edge_agent.fastpath_client.FastPathClient`, the
default), or the `Acquisition` of an agent inside ImSwitch's process.

Everything an image is travels as the front door's own fields: the whole open manifest
(channel colours, the time interval and time point, the well, ImSwitch's OMERO ids) as the
experiment spec, ImSwitch's local files as the experiment's local targets (the agent writes
them where ImSwitch looks; the Zarr store is the live target, written before a frame's
answer), each frame's measured metadata as `FrameInfo` (the agent keeps it as `PlaneMeta`
for the close), and the end as `finalize(not_planned=..., partial=...)`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import numpy as np

from edge_agent.frontdoor import FrontDoor
from edge_agent.models import SERVER as DOOR_SERVER
from edge_agent.models import ExperimentSpec, FrameInfo
from edge_agent.models import LocalTarget as DoorTarget
from tilebridge_imswitch.port import SERVER, LocalTarget, Progress, Target, Written
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import Layout, OpenManifest, PlaneMeta


class FrontDoorEdge:
    """The front door's errors are tilebridge's already (`TransientError`, `ConflictError`,
    `UnknownExperimentError`, `PermanentError`): they pass as they are."""

    def __init__(
        self, door: FrontDoor, server: bool = True, finalize_timeout_s: float = 600.0
    ) -> None:
        self.door = door
        self.server = server
        self.finalize_timeout_s = finalize_timeout_s
        self._lock = threading.Lock()
        self._acquired: dict[UUID, datetime] = {}
        """When each open image started, as the agent stored it (frames' timestamps)."""

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        if not local and not self.server:
            raise PermanentError(
                "nothing to write: the adapter's stream_to_server and ImSwitch's local files "
                "are both off"
            )
        started = self.door.start(spec_of(manifest, local, self.server))
        with self._lock:
            self._acquired[manifest.image_id] = started.acquired_at

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> Written:
        with self._lock:
            acquired = self._acquired.get(image_id)
        info = FrameInfo.at(
            key,
            x_um=meta.x_um,
            y_um=meta.y_um,
            z_um=meta.z_um,
            exposure_ms=meta.exposure_ms,
            timestamp=(
                acquired + timedelta(seconds=meta.delta_t_s)
                if acquired is not None and meta.delta_t_s is not None
                else None
            ),
        )
        answer = self.door.write_frame(image_id, pixels, info)
        return Written(answer.accepted, answer.landed)

    def close(self, image_id: UUID, not_planned: Sequence[int], partial: bool) -> None:
        self.door.finalize(
            image_id,
            partial=partial,
            not_planned=list(not_planned),
            timeout=self.finalize_timeout_s,
        )
        with self._lock:
            self._acquired.pop(image_id, None)

    def progress(self, image_id: UUID) -> Progress:
        answer = self.door.experiment(image_id)
        targets = {}
        for name, backend in answer.backends.items():
            target = Target(backend.state, backend.error, backend.location)
            targets[SERVER if name == DOOR_SERVER else name] = target
        return Progress(image_id, targets)

    def abort(self, image_id: UUID) -> None:
        self.door.abort(image_id)


def spec_of(m: OpenManifest, local: Sequence[LocalTarget], server: bool) -> ExperimentSpec:
    """The whole manifest as the front door's experiment spec, with the local targets."""
    targets = [DoorTarget(kind=t.kind, folder=t.folder, live=t.live) for t in local]
    return ExperimentSpec.from_manifest(m, layout=Layout.MOSAIC, targets=targets, server=server)

"""The port over the edge's one front door (`edge_agent.frontdoor.FrontDoor`): the fast-path
client to a running agent (`edge_agent.fastpath_client.FastPathClient`), or the agent's
in-process `Acquisition`.

The front door does what the stopgap does for the older edges: the agent writes the local
files itself (`ExperimentSpec.targets`, the named-layout kinds of `tilebridge_storage`), keeps
each frame's measured metadata for the close (`FrameInfo` -> `PlaneMeta`), and closes an
image with the tiles it has (`finalize(partial=True)`). So it is wired without the stopgap.

What its spec has no field for yet travels as key-values, as over HTTP: channel colours,
the time interval, the time point, the well, ImSwitch's OMERO ids.
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
from edge_agent.models import ExperimentSpec, FrameInfo, Point
from edge_agent.models import LocalTarget as DoorTarget
from tilebridge_imswitch.edge_http import flattened_key_values
from tilebridge_imswitch.port import SERVER, LocalTarget, Progress, Target
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
        started = self.door.start(spec_of(manifest, local, self.server))
        with self._lock:
            self._acquired[manifest.image_id] = started.acquired_at

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        with self._lock:
            acquired = self._acquired.get(image_id)
        info = FrameInfo(
            tile_index=key.index,
            z_index=key.z,
            channel_index=key.c,
            time_index=key.t,
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
        return self.door.write_frame(image_id, pixels, info).accepted

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        # Tiles never taken (a round area's holes): closed with the frames it has.
        self.door.finalize(image_id, partial=bool(never_taken), timeout=self.finalize_timeout_s)
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
    return ExperimentSpec(
        experiment=m.experiment,
        image_name=m.image_name,
        image_id=m.image_id,
        tile_width=m.tile_width,
        tile_height=m.tile_height,
        dtype=m.dtype,
        pixel_size_um=m.pixel_size.x_um,
        pixel_size_y_um=m.pixel_size.y_um,
        z_step_um=m.pixel_size.z_um,
        positions=[
            Point(x_um=p.x_um, y_um=p.y_um, z_um=p.z_um)
            for p in sorted(m.positions, key=lambda p: p.index)
        ],
        channels=list(m.channels),
        size_c=m.size_c,
        size_z=m.size_z,
        size_t=m.size_t,
        key_values=flattened_key_values(m),
        tags=list(m.tags),
        acquired_at=m.acquired_at,
        project=m.project,
        dataset=m.dataset,
        layout=Layout.MOSAIC,
        targets=[DoorTarget(kind=t.kind, folder=t.folder) for t in local],
        server=server,
    )

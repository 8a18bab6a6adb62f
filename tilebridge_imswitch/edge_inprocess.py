"""The port over an edge agent running inside ImSwitch's process: its front door
(`EdgeApp(...).acquisition`), given the whole manifest (channel colours, time interval and
well travel as such) and each frame's measured metadata. Local files and holes are the
`stopgap`'s. The agent is made and started by the composition root (`root`) and stopped
with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import numpy as np

from edge_agent.acquisition import Acquisition
from edge_agent.models import SERVER as DOOR_SERVER
from edge_agent.models import ExperimentSpec, FrameInfo
from tilebridge_imswitch.port import SERVER, LocalTarget, Progress, Target
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta


class AgentEdge:
    def __init__(self, door: Acquisition) -> None:
        self.door = door

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        if local:
            raise PermanentError("the in-process agent takes no local targets here")
        self.door.start(ExperimentSpec.from_manifest(manifest, targets=[], server=True))

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        info = FrameInfo(
            tile_index=key.index, z_index=key.z, channel_index=key.c, time_index=key.t,
            x_um=meta.x_um, y_um=meta.y_um, z_um=meta.z_um, exposure_ms=meta.exposure_ms,
        )  # fmt: skip
        return self.door.write_frame(image_id, pixels, info).accepted

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        self.door.finalize(image_id, partial=bool(never_taken))

    def progress(self, image_id: UUID) -> Progress:
        answer = self.door.experiment(image_id)
        server = answer.backends.get(DOOR_SERVER)
        if server is None:
            return Progress(image_id, {SERVER: Target("writing")})
        return Progress(image_id, {SERVER: Target(server.state, server.error, server.location)})

    def abort(self, image_id: UUID) -> None:
        self.door.abort(image_id)

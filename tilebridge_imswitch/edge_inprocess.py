"""The port over an edge agent running inside ImSwitch's process (`edge_agent.agent`).

It takes the whole manifest (channel colours, time interval, well travel as such), but the
agent builds the close itself, without the measured plane metadata; local files and holes
are the `stopgap`'s. The agent is made and started by the composition root (`root`) and
stopped with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import numpy as np

from edge_agent.agent import EdgeAgent
from tilebridge_imswitch.port import SERVER, LocalTarget, Progress, Target
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import ImageState, OpenManifest, PlaneMeta


class AgentEdge:
    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        if local:
            raise PermanentError("the in-process agent takes no local targets yet")
        self.agent.open_image(manifest)

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        del meta  # the agent has no place for it yet (its close lists digests only)
        return self.agent.write_tile(image_id, key, pixels)

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        if never_taken:
            raise PermanentError(
                f"the agent cannot close an image with {len(never_taken)} tiles never taken yet"
            )
        self.agent.finalize(image_id)

    def progress(self, image_id: UUID) -> Progress:
        ack = self.agent.wait_done([image_id], 0).get(image_id)
        if ack is None:
            return Progress(image_id, {SERVER: Target("writing")})
        locations = "; ".join(f"{k}: {v}" for k, v in sorted(ack.locations.items()))
        if ack.state is ImageState.COMPLETE:
            return Progress(image_id, {SERVER: Target("finished", location=locations)})
        error = f"server: {ack.reason}: {ack.detail}"
        return Progress(image_id, {SERVER: Target("failed", error=error)})

    def abort(self, image_id: UUID) -> None:
        # Frames already buffered still reach the server, as with the agent's HTTP API.
        del image_id

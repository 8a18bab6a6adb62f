"""The acquisition-facing API: what a microscope control program calls per frame."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.agent import EdgeAgent
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest


class FrameMetadata(BaseModel):
    """What the acquisition knows about one camera frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_index: int = Field(ge=0)
    z: int = Field(default=0, ge=0)
    c: int = Field(default=0, ge=0)
    t: int = Field(default=0, ge=0)
    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    exposure_ms: float | None = None


class TileScanWriter:
    """Writes one tile scan (one image) through the agent.

    `write_frame` returns as soon as the frame is durable in the disk buffer: it never waits
    on the broker, the server or OMERO. Writing a frame that was already written (e.g. after
    the acquisition program restarted) changes nothing.
    """

    def __init__(self, agent: EdgeAgent, manifest: OpenManifest) -> None:
        self.agent = agent
        self.manifest = manifest
        agent.open_image(manifest)

    @property
    def image_id(self) -> UUID:
        return self.manifest.image_id

    def write_frame(
        self, frame: np.ndarray[Any, Any], metadata: FrameMetadata | dict[str, Any]
    ) -> bool:
        meta = metadata if isinstance(metadata, FrameMetadata) else FrameMetadata(**metadata)
        key = TileKey(meta.tile_index, meta.z, meta.c, meta.t)
        return self.agent.write_tile(self.image_id, key, frame)

    def finalize(self) -> CloseManifest:
        return self.agent.finalize(self.image_id)

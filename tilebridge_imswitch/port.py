"""The narrow port the ImSwitch writer drives: what it needs of the edge agent, nothing more.

    edge.open(manifest, local)              # start an image; `local`: files to write on the Pi
    edge.write(image_id, key, pixels, meta) -> Written   # accepted; in the live target yet
    edge.close(image_id, not_planned, partial)   # every frame is in: positions never planned,
                                                 # or planned frames missing (stopped early)
    edge.progress(image_id) -> Progress     # per target, and where the server stored it
    edge.abort(image_id)                    # the user stopped: discard the local files

Errors are tilebridge's: `TransientError` (try again: the agent is restarting, its disk is
full), `PermanentError` (this will not work: the reason says why). The implementation is
`edge_frontdoor.FrontDoorEdge`, over the edge's one front door: its fast-path client to the
`edge-agent run` service, or an agent inside ImSwitch's process. It must be safe to call
from several threads for different images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from uuid import UUID

import numpy as np

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta

SERVER = "server"
"""Progress name of the stream to the tilebridge server (which writes OMERO, the archive)."""
TargetState = Literal["writing", "finished", "failed"]
_OMERO = re.compile(r"omero:Image:(\d+)\S*\s+dataset:(\d+)")


@dataclass(frozen=True)
class LocalTarget:
    """A local file target: a storage backend kind (tilebridge_storage.registry) and the
    folder it writes under; `live`: a viewer reads it after every frame (ImSwitch's live
    view, its Zarr store), so a frame's answer waits until it is there."""

    kind: str
    folder: Path
    live: bool = False


@dataclass(frozen=True)
class Written:
    """The agent's answer to a frame."""

    accepted: bool
    """False: that tile was written before (same pixels): nothing changed."""
    landed: bool | None = None
    """True: the live target (ImSwitch's Zarr store) has the frame now; False: it failed it
    or was too slow; None: there is no live target."""


@dataclass(frozen=True)
class Target:
    state: TargetState
    error: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class Progress:
    image_id: UUID
    targets: dict[str, Target] = field(default_factory=dict)

    @property
    def omero_ids(self) -> tuple[int, int] | None:
        """(image id, dataset id) in OMERO, once the server stored the image there."""
        server = self.targets.get(SERVER)
        found = _OMERO.search(server.location or "") if server else None
        return (int(found[1]), int(found[2])) if found else None


class Edge(Protocol):
    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None: ...

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> Written: ...

    def close(self, image_id: UUID, not_planned: Sequence[int], partial: bool) -> None: ...

    def progress(self, image_id: UUID) -> Progress: ...

    def abort(self, image_id: UUID) -> None: ...

"""The narrow port the ImSwitch writer drives: what it needs of the edge agent, nothing more.

    edge.open(manifest, local)           # start an image; `local`: files to write on the Pi
    edge.write(image_id, key, pixels, meta) -> bool   # False: that tile was already written
    edge.close(image_id, never_taken)    # every tile is in, except those never acquired
    edge.progress(image_id) -> Progress  # per target, and where the server stored it
    edge.abort(image_id)                 # the user stopped: discard the local files

Errors are tilebridge's: `TransientError` (try again: the agent is restarting, its disk is
full), `PermanentError` (this will not work: the reason says why). Implementations:
`edge_frontdoor.FrontDoorEdge` (the edge's one front door: its fast-path client), and for
agents without it `edge_http.HttpEdge` (the HTTP API) and `edge_inprocess.AgentEdge` (an
agent in the same process), those two wrapped in `stopgap.Stopgap` for what they do not do
(local files where ImSwitch looks, closing an image with holes). Any implementation must be
safe to call from several threads for different images.
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
    folder it writes under."""

    kind: str
    folder: Path


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
    ) -> bool: ...

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None: ...

    def progress(self, image_id: UUID) -> Progress: ...

    def abort(self, image_id: UUID) -> None: ...

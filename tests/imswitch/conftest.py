"""A recording edge for the adapter's own tests: what the server stream would get, kept in
memory, with the local files written for real by the stopgap (as in production)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from tilebridge_imswitch import root
from tilebridge_imswitch.port import SERVER, LocalTarget, Progress, Target
from tilebridge_imswitch.settings import AdapterSettings
from tilebridge_imswitch.stopgap import Stopgap
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta


@dataclass
class Recorder:
    """An `Edge` that keeps everything it is given."""

    manifests: dict[UUID, OpenManifest] = field(default_factory=dict)
    tiles: dict[UUID, dict[TileKey, np.ndarray[Any, Any]]] = field(default_factory=dict)
    planes: dict[UUID, dict[TileKey, PlaneMeta]] = field(default_factory=dict)
    closed: dict[UUID, list[TileKey]] = field(default_factory=dict)
    aborted: set[UUID] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        assert not local
        with self.lock:
            self.manifests[manifest.image_id] = manifest
            self.tiles[manifest.image_id] = {}
            self.planes[manifest.image_id] = {}

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        with self.lock:
            if image_id in self.closed:
                raise PermanentError("closed")
            if key in self.tiles[image_id]:
                return False
            self.tiles[image_id][key] = np.array(pixels)
            self.planes[image_id][key] = meta
            return True

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        with self.lock:
            self.closed[image_id] = list(never_taken)

    def progress(self, image_id: UUID) -> Progress:
        state = "finished" if image_id in self.closed else "writing"
        return Progress(image_id, {SERVER: Target(state, location="omero:Image:7 dataset:3")})  # type: ignore[arg-type]

    def abort(self, image_id: UUID) -> None:
        self.aborted.add(image_id)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """The process's session: a Recorder behind the stopgap (files written for real)."""
    rec = Recorder()
    root.configure(
        AdapterSettings(finalize_grace_s=0.05, retry_for_s=1), edge=Stopgap(rec, "scope-1")
    )
    yield rec
    root.close()

"""The ingest's engine (core, staging, ledger, storer) wired to real files, a real SQLite
ledger and a real archive, with its answers captured in a list instead of a broker."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

from server_ingest.app import Engine
from server_ingest.events import Inbound
from server_ingest.ledger.base import Ledger
from server_ingest.settings import IngestSettings, Limits
from server_ingest.state import Snapshot
from tilebridge_protocol.framing import encode_tile, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    AnyAck,
    CloseManifest,
    CreditAck,
    ImageAck,
    OpenManifest,
    TileAck,
    TileDigest,
    TileState,
)
from tilebridge_protocol.status import ImageStatus
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import StorageBackend

DEVICE = "scope-1"


class Recorder:
    """An outbox that keeps every ack and image status."""

    def __init__(self) -> None:
        self.acks: list[tuple[str, AnyAck]] = []
        self.credits: list[tuple[str, CreditAck]] = []
        """Windows granted (flow control), kept apart from the answers to messages."""
        self.statuses: list[ImageStatus] = []
        self.changed = threading.Condition()

    def ack(self, device: str, ack: AnyAck) -> None:
        with self.changed:
            if isinstance(ack, CreditAck):
                self.credits.append((device, ack))
            else:
                self.acks.append((device, ack))
            self.changed.notify_all()

    def image_status(self, status: ImageStatus, done: bool) -> None:
        with self.changed:
            self.statuses.append(status)
            self.changed.notify_all()

    def tile_acks(self, state: TileState | None = None) -> list[TileAck]:
        with self.changed:
            acks = [a for _, a in self.acks]
        return [a for a in acks if isinstance(a, TileAck) and (state is None or a.state is state)]

    def wait_image_ack(self, image_id: UUID, timeout: float = 20) -> ImageAck:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for _, ack in self.acks:
                    if isinstance(ack, ImageAck) and ack.image_id == image_id:
                        return ack
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no image ack for {image_id}")
                self.changed.wait(remaining)


class Clock:
    """The wall clock the engine stamps events with: real time, plus what a test skips."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


class Harness:
    def __init__(
        self,
        root: Path,
        limits: Limits | None = None,
        backends: Sequence[StorageBackend] | None = None,
        ledger: Ledger | None = None,
        **settings: Any,
    ) -> None:
        self.root = root
        self.recorder = Recorder()
        self.settings = IngestSettings(
            data_dir=root, limits=limits or Limits(), store_retry_s=0.1, **settings
        )
        self.backends = (
            list(backends) if backends is not None else [ArchiveBackend(root / "archive")]
        )
        self.clock = Clock()
        self.engine = Engine(
            self.settings, self.recorder, self.backends, ledger, clock=self.clock
        ).start()
        self.staging = self.engine.staging

    def close(self) -> None:
        self.engine.stop()

    def send(
        self, kind: DeviceTopic, payload: bytes, device: str = DEVICE, idle: bool = True
    ) -> None:
        self.engine.handle(Inbound(device_topic(device, kind), payload))
        if idle:
            self.engine.wait_idle()

    def scan(
        self,
        manifest: OpenManifest,
        tiles: dict[TileKey, np.ndarray[Any, Any]],
        chunk_size: int = 2048,
    ) -> None:
        """Open, every tile, close: what a well-behaved device sends."""
        self.send(DeviceTopic.OPEN, manifest.to_bytes())
        for key, pixels in tiles.items():
            for message in chunks(manifest, key, pixels, chunk_size):
                self.send(DeviceTopic.CHUNK, message)
        self.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())

    @property
    def stats(self) -> Snapshot:
        return self.engine.snapshot()

    def tile_rows(self, image_id: UUID, device: str = DEVICE) -> int:
        with closing(sqlite3.connect(self.settings.ledger_path)) as db:
            row = db.execute(
                "SELECT COUNT(*) FROM tiles WHERE device = ? AND image_id = ?",
                (device, str(image_id)),
            ).fetchone()
        return int(row[0])

    def phase(self, image_id: UUID, device: str = DEVICE) -> tuple[str, str | None, str | None]:
        with closing(sqlite3.connect(self.settings.ledger_path)) as db:
            row = db.execute(
                "SELECT phase, reason, detail FROM images WHERE device = ? AND image_id = ?",
                (device, str(image_id)),
            ).fetchone()
        return tuple(row) if row else ("", None, None)  # type: ignore[return-value]


def tiles_for(manifest: OpenManifest, seed: int = 0) -> dict[TileKey, np.ndarray[Any, Any]]:
    from tilebridge_storage.testing.manifests import make_tiles

    return make_tiles(manifest, seed)


def chunks(
    manifest: OpenManifest, key: TileKey, pixels: np.ndarray[Any, Any], size: int = 2048
) -> list[bytes]:
    data = np.ascontiguousarray(pixels, dtype=manifest.dtype.numpy).tobytes()
    return list(encode_tile(manifest.image_id, key, data, chunk_size=size))


def close_for(manifest: OpenManifest, tiles: dict[TileKey, np.ndarray[Any, Any]]) -> CloseManifest:
    return CloseManifest(
        image_id=manifest.image_id,
        tile_count=manifest.tile_count,
        digests=tuple(
            TileDigest(tile=k, digest=tile_digest(np.ascontiguousarray(tiles[k]).tobytes()).hex())
            for k in manifest.tile_keys()
        ),
    )

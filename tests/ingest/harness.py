"""An Ingest wired to real staging, ledger and archive, with acks captured in a list."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

from server_ingest.ingest import Ack, ImageProgress, Ingest
from server_ingest.ledger import ImageRecord, Ledger
from server_ingest.settings import Limits
from server_ingest.staging import Staging
from server_ingest.storer import Storer
from tilebridge_protocol.framing import encode_tile, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    ImageAck,
    OpenManifest,
    TileAck,
    TileDigest,
    TileState,
)
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_storage.archive import ArchiveBackend

DEVICE = "scope-1"


class Recorder:
    def __init__(self) -> None:
        self.acks: list[tuple[str, Ack]] = []
        self.statuses: list[tuple[ImageRecord, ImageProgress]] = []
        self.changed = threading.Condition()

    def ack(self, device: str, ack: Ack) -> None:
        with self.changed:
            self.acks.append((device, ack))
            self.changed.notify_all()

    def image_changed(self, record: ImageRecord, progress: ImageProgress) -> None:
        self.statuses.append((record, progress))

    def tile_acks(self, state: TileState | None = None) -> list[TileAck]:
        return [
            a
            for _, a in self.acks
            if isinstance(a, TileAck) and (state is None or a.state is state)
        ]

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


class Harness:
    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.recorder = Recorder()
        self.ledger = Ledger(root / "ledger.sqlite")
        self.staging = Staging(root / "staging")
        self.storer = Storer(
            [ArchiveBackend(root / "archive")], self.ledger, self.staging, retry_s=0.1
        )
        self.ingest = Ingest(
            self.ledger, self.staging, self.recorder, self.storer, limits or Limits()
        )
        self.storer.listener = self.ingest
        self.storer.start()

    def close(self) -> None:
        self.ingest.close()
        self.storer.stop()
        self.ledger.close()

    def send(self, kind: DeviceTopic, payload: bytes, device: str = DEVICE) -> None:
        self.ingest.handle(device_topic(device, kind), payload)
        self.ingest.wait_idle()


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

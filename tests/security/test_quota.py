"""`Limits.max_staged_bytes_per_device`: one device cannot fill the server's staging disk.

A tile that would take a device over its quota is not staged and not acknowledged; the device
is told why (`quota_exceeded`) and keeps the tile, re-sending it after its commit timeout.
Other devices are not affected, and the quota frees up as images are stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest

from server_ingest.app import Engine
from server_ingest.events import Inbound
from server_ingest.settings import IngestSettings, Limits
from tests.security.fakes import FakeOutbox
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.framing import encode_tile, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    OpenManifest,
    PixelSize,
    StagePosition,
    TileAck,
    TileDigest,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import ImageWriter, StorageBackend

TILE_BYTES = 32 * 32 * 2
QUOTA = 3 * TILE_BYTES


def manifest(tiles: int = 2) -> OpenManifest:
    return OpenManifest(
        image_id=uuid4(),
        experiment="quota",
        project="p",
        dataset="d",
        image_name="i",
        tile_width=32,
        tile_height=32,
        dtype="uint16",
        positions=tuple(StagePosition(index=i, x_um=i * 16.0, y_um=0) for i in range(tiles)),
        pixel_size=PixelSize(x_um=0.5, y_um=0.5),
        acquired_at=datetime(2026, 11, 24, tzinfo=UTC),
    )


def tile(key: TileKey, seed: int) -> bytes:
    return np.random.default_rng(seed + key.index).integers(0, 999, (32, 32), "<u2").tobytes()


class Refusing(StorageBackend):
    kind = "refusing"

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        raise PermanentError("backend refused")


class Server:
    def __init__(self, root: Path, backend: StorageBackend | None = None) -> None:
        self.outbox = FakeOutbox()
        settings = IngestSettings(data_dir=root, limits=Limits(max_staged_bytes_per_device=QUOTA))
        backend = backend or ArchiveBackend(root / "archive")
        self.engine = Engine(settings, self.outbox, [backend]).start()
        self.staging = self.engine.staging

    def send(self, device: str, kind: DeviceTopic, payload: bytes) -> list[object]:
        start = len(self.outbox.acks)
        self.engine.handle(Inbound(device_topic(device, kind), payload))
        self.engine.wait_idle()  # complete tiles are verified off the core's thread
        assert all(d == device for d, _ in self.outbox.acks[start:])
        return [a for _, a in self.outbox.acks[start:]]

    def image_ack(self, image_id: object) -> ImageAck:
        from devtools.stack import wait_for

        def found() -> ImageAck | None:
            return next(
                (
                    a
                    for _, a in list(self.outbox.acks)
                    if isinstance(a, ImageAck) and a.image_id == image_id
                ),
                None,
            )

        ack: ImageAck = wait_for(found, 20, "the image ack")
        return ack

    def open(self, device: str, m: OpenManifest) -> OpenAck:
        (ack,) = self.send(device, DeviceTopic.OPEN, m.to_bytes())
        assert isinstance(ack, OpenAck)
        return ack

    def tile(self, device: str, m: OpenManifest, key: TileKey, seed: int = 0) -> list[object]:
        acks = []
        for chunk in encode_tile(m.image_id, key, tile(key, seed), chunk_size=1024):
            acks += self.send(device, DeviceTopic.CHUNK, chunk)
        return acks

    def close(self, device: str, m: OpenManifest, seed: int = 0) -> None:
        digests = tuple(
            TileDigest(tile=k, digest=tile_digest(tile(k, seed)).hex()) for k in m.tile_keys()
        )
        close = CloseManifest(image_id=m.image_id, tile_count=m.tile_count, digests=digests)
        self.send(device, DeviceTopic.CLOSE, close.to_bytes())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.engine.stop()


def committed(acks: list[object]) -> bool:
    return any(isinstance(a, TileAck) and a.state is TileState.COMMITTED for a in acks)


def test_a_device_over_its_quota_is_told_and_its_tile_is_not_staged(server: Server) -> None:
    first, second = manifest(), manifest()
    assert server.open("scope-a", first).state is ManifestState.ACCEPTED
    assert server.open("scope-a", second).state is ManifestState.ACCEPTED
    for key in first.tile_keys():
        assert committed(server.tile("scope-a", first, key))
    assert committed(server.tile("scope-a", second, TileKey(0)))  # 3 tiles: the quota

    acks = server.tile("scope-a", second, TileKey(1))
    assert acks and all(isinstance(a, ErrorAck) for a in acks)
    refusal = acks[0]
    assert isinstance(refusal, ErrorAck)
    assert refusal.reason is ReasonCode.QUOTA_EXCEEDED and refusal.image_id == second.image_id
    assert not (server.staging.image_dir("scope-a", second.image_id) / "1_0_0_0.part").exists()
    assert server.engine.snapshot().rejections["quota_exceeded"] == len(acks)

    # Another device has its own quota.
    other = manifest()
    assert server.open("scope-b", other).state is ManifestState.ACCEPTED
    assert committed(server.tile("scope-b", other, TileKey(0)))

    # Once the first image is stored (and its staged tiles removed), the tile gets in.
    server.close("scope-a", first)
    assert server.image_ack(first.image_id).state is ImageState.COMPLETE
    server.engine.wait_idle()
    assert not server.staging.image_dir("scope-a", first.image_id).exists()
    assert committed(server.tile("scope-a", second, TileKey(1)))


def test_an_image_larger_than_the_quota_is_refused_at_open(server: Server) -> None:
    ack = server.open("scope-a", manifest(tiles=4))
    assert ack.state is ManifestState.REJECTED and ack.reason is ReasonCode.QUOTA_EXCEEDED


def test_failed_images_keep_counting_against_the_quota(tmp_path: Path) -> None:
    """Their tiles stay staged for an operator, so they still take space."""
    server = Server(tmp_path, Refusing())
    first, second = manifest(), manifest()
    server.open("scope-a", first)
    server.open("scope-a", second)
    for key in first.tile_keys():
        server.tile("scope-a", first, key)
    server.close("scope-a", first)
    assert server.image_ack(first.image_id).state is ImageState.FAILED
    assert committed(server.tile("scope-a", second, TileKey(0)))
    acks = server.tile("scope-a", second, TileKey(1))
    assert [a.reason for a in acks if isinstance(a, ErrorAck)] == [ReasonCode.QUOTA_EXCEEDED] * 2
    server.engine.stop()

"""The ingest (staging, ledger, storer) writing into OMERO while the tiles arrive."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

from tests.ingest.harness import DEVICE, Harness, chunks, close_for, tiles_for
from tests.omero.helpers import digest, expected_pixels, settings_for, unique_manifest
from tilebridge_protocol.messages import ImageState, OpenManifest, TileState
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.omero_backend.backend import OmeroBackend


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture
def pyramids(omero_standin_factory: Any) -> Any:
    return omero_standin_factory(pyramid_threshold_px=50 * 50, pyramid_tile=(32, 16))


@pytest.fixture
def harness(tmp_path: Path, pyramids: Any) -> Iterator[Harness]:
    # the archive stays; OMERO is the second backend of every image
    omero = OmeroBackend(settings_for(pyramids, keepalive_s=1.0))
    h = Harness(tmp_path, backends=[ArchiveBackend(tmp_path / "archive"), omero])
    yield h
    h.close()


def send_tiles(harness: Harness, manifest: OpenManifest, tiles: Any, keys: Any) -> None:
    for key in keys:
        for message in chunks(manifest, key, tiles[key]):
            harness.send(DeviceTopic.CHUNK, message)


def test_tiles_reach_omero_during_the_acquisition(harness: Harness, pyramids: Any) -> None:
    server = pyramids.server
    manifest = unique_manifest(size_z=1, size_c=1, channels=["DAPI"])
    tiles = tiles_for(manifest)
    keys = manifest.tile_keys()
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    send_tiles(harness, manifest, tiles, keys[:3])  # the first row of the 3 x 2 scan
    wait_until(lambda: server.set_tile_calls > 0)
    [image] = server.images()
    assert server.pixel_state(image.getId().getValue()) == "writing"

    send_tiles(harness, manifest, tiles, keys[3:])
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    ack = harness.recorder.wait_image_ack(manifest.image_id)
    assert ack.state is ImageState.COMPLETE
    image_id = image.getId().getValue()
    assert ack.locations["omero"].startswith(f"omero:Image:{image_id} dataset:")
    assert server.pixel_state(image_id) == "complete"
    assert digest(server.pixels(image_id)) == digest(expected_pixels(manifest, tiles))


def test_omero_down_during_the_acquisition_is_retried_to_one_whole_image(
    harness: Harness, pyramids: Any
) -> None:
    server = pyramids.server
    manifest = unique_manifest()
    tiles = tiles_for(manifest)
    keys = manifest.tile_keys()
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    first_row = [k for k in keys if k.index < 3]  # all planes of the first row of tiles
    send_tiles(harness, manifest, tiles, first_row)
    wait_until(lambda: server.set_tile_calls > 0)
    server.stop()
    send_tiles(harness, manifest, tiles, [k for k in keys if k not in first_row])
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    wait_until(lambda: harness.stats.backends.get("omero", "ok") != "ok")
    server.start()

    ack = harness.recorder.wait_image_ack(manifest.image_id)
    assert ack.state is ImageState.COMPLETE
    [image] = server.images()
    image_id = image.getId().getValue()
    assert ack.locations["omero"].startswith(f"omero:Image:{image_id} dataset:")
    assert server.pixel_state(image_id) == "complete"
    assert digest(server.pixels(image_id)) == digest(expected_pixels(manifest, tiles))


def test_omero_down_when_the_image_opens_then_up_completes_the_image(
    harness: Harness, pyramids: Any
) -> None:
    server = pyramids.server
    server.stop()
    manifest = unique_manifest()
    tiles = tiles_for(manifest)
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    send_tiles(harness, manifest, tiles, manifest.tile_keys())
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    # Every tile is committed to the device although OMERO is unreachable...
    committed = {a.tile for a in harness.recorder.tile_acks(TileState.COMMITTED)}
    assert committed == set(tiles)
    # ...and the image's status says why it is not stored yet.
    wait_until(lambda: any(s.error and "omero" in s.error for s in harness.recorder.statuses))
    server.start()
    ack = harness.recorder.wait_image_ack(manifest.image_id, timeout=60)
    assert ack.state is ImageState.COMPLETE
    [image] = server.images()
    assert digest(server.pixels(image.getId().getValue())) == digest(
        expected_pixels(manifest, tiles)
    )


def test_a_permission_failure_fails_the_image_with_its_reason_and_keeps_the_tiles(
    harness: Harness, pyramids: Any
) -> None:
    server = pyramids.server
    server.faults.forbid_create = {"Project", "Dataset"}
    manifest = unique_manifest(project="forbidden-project")
    tiles = tiles_for(manifest)
    harness.send(DeviceTopic.OPEN, manifest.to_bytes())
    send_tiles(harness, manifest, tiles, manifest.tile_keys())
    harness.send(DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
    ack = harness.recorder.wait_image_ack(manifest.image_id)
    assert ack.state is ImageState.FAILED
    assert ack.reason is ReasonCode.STORAGE_FAILED
    assert ack.detail and "permission denied" in ack.detail
    status = harness.recorder.statuses[-1]
    assert status.phase is ImagePhase.FAILED and status.error and ack.detail in status.error
    staged = harness.staging.image_dir(DEVICE, manifest.image_id)
    assert sorted(p.name for p in staged.glob("*.tile")) == sorted(
        f"{k.slug()}.tile" for k in manifest.tile_keys()
    )
    assert not server.images()

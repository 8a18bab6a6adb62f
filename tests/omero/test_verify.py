"""Read-back verification before `complete` (issue 13): OMERO's digest of what it holds
(RawPixelsStore.calculateMessageDigest) against the digest of what the ingest wrote. The
stand-in flips a byte of one written tile: the write is caught, deleted, rewritten and
completes; a mismatch every time fails the image with `verify_failed`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

from tests.ingest.harness import Harness, tiles_for
from tests.omero.helpers import expected_pixels, settings_for, unique_manifest
from tilebridge_protocol.messages import ImageState
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.provenance import PROVENANCE_NS


@pytest.fixture(params=["romio", "pyramid"])
def server(request: pytest.FixtureRequest, omero_standin_factory: Any) -> Any:
    if request.param == "pyramid":
        return omero_standin_factory(pyramid_threshold_px=50 * 50, pyramid_tile=(32, 16))
    return omero_standin_factory()


@pytest.fixture
def harness(tmp_path: Path, server: Any) -> Iterator[Harness]:
    omero = OmeroBackend(settings_for(server, keepalive_s=None))
    h = Harness(tmp_path, backends=[ArchiveBackend(tmp_path / "archive"), omero])
    yield h
    h.close()


def omero_sha1(manifest: Any, tiles: Any) -> str:
    """What calculateMessageDigest answers for these tiles: XYZCT planes, big-endian."""
    pixels = expected_pixels(manifest, tiles)
    return hashlib.sha1(pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()).hexdigest()


def test_a_byte_flipped_in_omero_is_caught_rewritten_and_completes(
    harness: Harness, server: Any
) -> None:
    standin = server.server
    standin.faults.flip_byte = 1
    manifest = unique_manifest()
    tiles = tiles_for(manifest)
    harness.scan(manifest, tiles)
    ack = harness.recorder.wait_image_ack(manifest.image_id, timeout=60)
    assert ack.state is ImageState.COMPLETE, ack
    assert standin.faults.flip_byte == 0  # the first write was corrupted
    [image] = standin.images()  # the corrupted one is gone
    image_id = image.getId().getValue()
    assert ack.locations["omero"].startswith(f"omero:Image:{image_id} ")
    sha1 = omero_sha1(manifest, tiles)
    assert ack.digests["omero"] == f"sha1:{sha1}"
    assert standin.pixels(image_id).tobytes() == expected_pixels(manifest, tiles).tobytes()
    assert ("pixels_digest", f"sha1:{sha1}") in standin.key_values(image_id, PROVENANCE_NS)
    assert image.getPrimaryPixels().getSha1().getValue() == sha1  # as RawPixelsBean.save
    harness.engine.wait_idle()
    retried = harness.stats.store_buckets[("omero", "retry")]
    assert retried[-1] == 1  # one rewrite


def test_a_mismatch_every_time_fails_the_image_with_its_reason(
    harness: Harness, server: Any
) -> None:
    standin = server.server
    standin.faults.flip_byte = -1
    manifest = unique_manifest()
    tiles = tiles_for(manifest)
    harness.scan(manifest, tiles)
    ack = harness.recorder.wait_image_ack(manifest.image_id, timeout=60)
    assert ack.state is ImageState.FAILED
    assert ack.reason is ReasonCode.VERIFY_FAILED
    assert ack.detail and "holds other pixels than written" in ack.detail
    assert "3 writes" in ack.detail
    assert standin.images() == []  # nothing half-right is left in OMERO
    staged = harness.staging.image_dir(harness.recorder.acks[0][0], manifest.image_id)
    assert len(list(staged.glob("*.tile"))) == manifest.tile_count
    assert harness.phase(manifest.image_id)[:2] == ("failed", "verify_failed")


def test_verification_can_be_turned_off(tmp_path: Path, server: Any) -> None:
    omero = OmeroBackend(settings_for(server, keepalive_s=None, verify=False))
    harness = Harness(tmp_path, backends=[omero])
    try:
        server.server.faults.flip_byte = 1
        manifest = unique_manifest()
        harness.scan(manifest, tiles_for(manifest))
        ack = harness.recorder.wait_image_ack(manifest.image_id, timeout=60)
        assert ack.state is ImageState.COMPLETE and "omero" not in ack.digests
    finally:
        harness.close()

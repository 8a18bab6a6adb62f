"""The archive's read-back check through the ingest (issue 13): a file that reads back other
pixels than written is rewritten (bounded) and only a match completes; persistent mismatch
fails the image with `verify_failed` and keeps its tiles staged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ingest.harness import DEVICE, Harness, tiles_for
from tests.ingest.test_faults import assert_stored_whole
from tests.storage.test_archive import _corrupting
from tilebridge_protocol.messages import ImageState
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage import archive
from tilebridge_storage.testing.manifests import make_manifest


def test_a_corrupted_archive_file_is_rewritten_and_its_digest_acked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "atomic_write", _corrupting([1]))
    harness = Harness(tmp_path)
    try:
        manifest = make_manifest()
        tiles = tiles_for(manifest)
        harness.scan(manifest, tiles)
        assert_stored_whole(harness, manifest, tiles)
        ack = harness.recorder.wait_image_ack(manifest.image_id)
        assert ack.digests["archive"].startswith("sha1:")
        harness.engine.wait_idle()
    finally:
        harness.close()
    from server_ingest.ledger.records import ImageKey
    from server_ingest.ledger.sqlite import SqliteLedger

    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    key = ImageKey(DEVICE, manifest.image_id)
    assert ledger.lookup([key])[key].digests == {"archive": ack.digests["archive"]}
    ledger.close()


def test_an_archive_that_never_reads_back_right_fails_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "atomic_write", _corrupting([1000]))
    harness = Harness(tmp_path, verify_attempts=2)
    try:
        manifest = make_manifest()
        harness.scan(manifest, tiles_for(manifest))
        ack = harness.recorder.wait_image_ack(manifest.image_id)
        assert ack.state is ImageState.FAILED and ack.reason is ReasonCode.VERIFY_FAILED
        assert ack.detail and "2 writes, none read back as written" in ack.detail
        staged = harness.staging.image_dir(DEVICE, manifest.image_id)
        assert len(list(staged.glob("*.tile"))) == manifest.tile_count
    finally:
        harness.close()

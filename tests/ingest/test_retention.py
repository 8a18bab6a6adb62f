"""Staging retention and disk pressure (issue 13): the policy removes exactly the staged
images it names (failed past `failed_s`, abandoned past `abandoned_s`, kept copies of stored
images past `stored_s`) and nothing else; a low staging disk refuses new images first, then
tiles, with `unavailable`, and sweeps kept copies of stored images first."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from server_ingest.events import DiskSpace
from server_ingest.retention import free_bytes
from server_ingest.settings import Limits, Retention
from tests.ingest.harness import DEVICE, Harness, chunks, close_for, tiles_for
from tilebridge_protocol.messages import (
    CloseManifest,
    ErrorAck,
    ImageAck,
    ImageState,
    OpenManifest,
    TileDigest,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.testing.manifests import make_manifest

TTL, FAILED_S, ABANDONED_S, STORED_S = 1000.0, 10_000.0, 5_000.0, 200.0


def wait_until(condition: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
    return value


def fail_by_conflict(harness: Harness) -> OpenManifest:
    """A close whose digests contradict the staged tiles: failed, tiles kept."""
    m = make_manifest(rows=1, columns=2)
    tiles = tiles_for(m)
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    for key, pixels in tiles.items():
        for message in chunks(m, key, pixels):
            harness.send(DeviceTopic.CHUNK, message)
    close = close_for(m, tiles)
    wrong = (TileDigest(tile=close.digests[0].tile, digest="0" * 32), *close.digests[1:])
    harness.send(
        DeviceTopic.CLOSE,
        CloseManifest(image_id=m.image_id, tile_count=m.tile_count, digests=wrong).to_bytes(),
    )
    assert harness.phase(m.image_id)[:2] == ("failed", "conflict")
    return m


def open_with_one_tile(harness: Harness) -> OpenManifest:
    m = make_manifest(rows=1, columns=2)
    tiles = tiles_for(m)
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    first = m.tile_keys()[0]
    for message in chunks(m, first, tiles[first]):
        harness.send(DeviceTopic.CHUNK, message)
    return m


def stored(harness: Harness) -> OpenManifest:
    m = make_manifest(rows=1, columns=2)
    harness.scan(m, tiles_for(m))
    assert harness.recorder.wait_image_ack(m.image_id).state is ImageState.COMPLETE
    return m


def test_retention_removes_exactly_what_the_policy_says(tmp_path: Path) -> None:
    policy = Retention(
        stored_s=STORED_S, failed_s=FAILED_S, abandoned_s=ABANDONED_S,
        reserve_bytes=0, floor_bytes=0, check_interval_s=0.1,
    )  # fmt: skip
    harness = Harness(tmp_path, Limits(image_ttl_s=TTL), retention=policy, keep_staged=True)
    try:
        old_copy, new_copy = stored(harness), stored(harness)
        failed_long_ago = fail_by_conflict(harness)
        abandoned = open_with_one_tile(harness)
        harness.clock.advance(TTL + 1)
        wait_until(lambda: harness.phase(abandoned.image_id)[0] == "expired")
        receiving = open_with_one_tile(harness)
        failed_recently = fail_by_conflict(harness)
        # The stored image's staged copy was written 300 s ago, the other's just now.
        folder = harness.staging.image_dir
        for f in folder(DEVICE, old_copy.image_id).iterdir():
            os.utime(f, (time.time() - 300, time.time() - 300))

        harness.clock.advance(FAILED_S - TTL + 500)  # past failed_s for the first failure only
        wait_until(lambda: harness.phase(failed_long_ago.image_id)[0] == "discarded")
        wait_until(lambda: harness.stats.retention_removed.get("stored") == 1)
        harness.engine.wait_idle()

        gone = {m.image_id for m in (old_copy, failed_long_ago, abandoned)}
        kept = {m.image_id for m in (new_copy, receiving, failed_recently)}
        for m in (old_copy, new_copy, failed_long_ago, abandoned, receiving, failed_recently):
            assert folder(DEVICE, m.image_id).exists() is (m.image_id in kept), m.image_id
        assert gone.isdisjoint(kept)
        phase, reason, detail = harness.phase(abandoned.image_id)
        assert (phase, reason) == ("discarded", "not_permitted")
        assert detail and detail.startswith("removed by the staging retention policy: abandoned")
        assert harness.phase(failed_recently.image_id)[0] == "failed"
        assert harness.phase(receiving.image_id)[0] == "expired"  # expired since, not removed
        assert harness.phase(old_copy.image_id)[0] == "complete"
        assert dict(harness.stats.retention_removed) == {"failed": 1, "expired": 1, "stored": 1}
    finally:
        harness.close()


def test_a_low_disk_refuses_new_images_first_then_tiles(tmp_path: Path) -> None:
    # Real free space, under a reserve set above it: new images are refused at once.
    reserve = free_bytes(tmp_path) + 2**40
    policy = Retention(reserve_bytes=reserve, floor_bytes=0, check_interval_s=3600)
    harness = Harness(tmp_path, retention=policy, keep_staged=True)
    try:
        wait_until(lambda: harness.stats.disk_pressure == "new_images_refused")
        m = make_manifest(rows=1, columns=2)
        harness.send(DeviceTopic.OPEN, m.to_bytes())
        [(_, refusal)] = harness.recorder.acks
        assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.UNAVAILABLE
        assert "new images wait" in refusal.detail
        assert harness.phase(m.image_id)[0] == ""  # nothing recorded: the device resends
    finally:
        harness.close()


def test_an_image_receiving_goes_on_until_the_floor_and_kept_copies_go_first(
    tmp_path: Path,
) -> None:
    policy = Retention(reserve_bytes=10**6, floor_bytes=10**5, check_interval_s=3600)
    harness = Harness(tmp_path, retention=policy, keep_staged=True)
    try:
        copy = stored(harness)
        for f in harness.staging.image_dir(DEVICE, copy.image_id).iterdir():
            os.utime(f, (time.time() - 300, time.time() - 300))
        m = make_manifest(rows=1, columns=3)
        tiles = tiles_for(m)
        keys = m.tile_keys()
        harness.send(DeviceTopic.OPEN, m.to_bytes())
        post = harness.engine.inbox.post
        post(DiskSpace(10**6 - 1))  # below the reserve: the scan in progress goes on
        for message in chunks(m, keys[0], tiles[keys[0]]):
            harness.send(DeviceTopic.CHUNK, message)
        assert harness.stats.disk_pressure == "new_images_refused"
        wait_until(lambda: not harness.staging.image_dir(DEVICE, copy.image_id).exists())
        post(DiskSpace(10**5 - 1))  # below the floor: tiles wait too
        for message in chunks(m, keys[1], tiles[keys[1]]):
            harness.send(DeviceTopic.CHUNK, message)
        refused = [a for _, a in harness.recorder.acks if isinstance(a, ErrorAck)]
        assert refused and refused[-1].reason is ReasonCode.UNAVAILABLE
        assert "tiles wait" in refused[-1].detail
        assert harness.tile_rows(m.image_id) == 1
        post(DiskSpace(10**9))  # space again: the device's resend is taken
        for key in keys[1:]:
            for message in chunks(m, key, tiles[key]):
                harness.send(DeviceTopic.CHUNK, message)
        harness.send(DeviceTopic.CLOSE, close_for(m, tiles).to_bytes())
        acks = [a for _, a in harness.recorder.acks if isinstance(a, ImageAck)]
        wait_until(lambda: harness.phase(m.image_id)[0] == "complete")
        assert harness.stats.retention_removed["stored"] == 1 and acks
    finally:
        harness.close()

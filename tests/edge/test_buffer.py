"""The disk buffer: durable before returning, resumable, bounded in memory, honest in stats."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_agent.buffer import DiskBuffer
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_storage.testing.manifests import make_manifest, make_tiles


def _bytes(pixels: np.ndarray) -> bytes:  # type: ignore[type-arg]
    return pixels.astype("<u2").tobytes()


def test_items_come_out_in_order_and_leave_only_when_done(tmp_path: Path) -> None:
    buffer = DiskBuffer(tmp_path)
    manifest = make_manifest(rows=1, columns=2)
    tiles = make_tiles(manifest)
    assert buffer.add_open(manifest)
    for key, pixels in tiles.items():
        assert buffer.add_tile(manifest.image_id, key, _bytes(pixels))
    buffer.add_close(manifest.image_id)
    items = [buffer.next_item(0.1) for _ in range(manifest.tile_count + 2)]
    assert [i.kind for i in items if i] == ["open"] + ["tile"] * manifest.tile_count + ["close"]
    assert buffer.next_item(0.05) is None
    stats = buffer.stats()
    assert (stats.tiles, stats.bytes) == (
        manifest.tile_count,
        manifest.tile_count * manifest.tile_bytes,
    )
    assert stats.oldest_pending_age_s is not None
    first_tile = items[1]
    assert first_tile and first_tile.key is not None
    assert buffer.read_tile(manifest.image_id, first_tile.key) == _bytes(tiles[first_tile.key])
    buffer.done(first_tile)
    assert buffer.stats().tiles == manifest.tile_count - 1
    buffer.close()


def test_a_crash_loses_nothing_and_unfinished_items_come_back(tmp_path: Path) -> None:
    """A child process buffers tiles, takes some out, and dies by SIGKILL mid-way."""
    manifest = make_manifest(rows=1, columns=2)
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from pathlib import Path
        from edge_agent.buffer import DiskBuffer
        from tilebridge_storage.testing.manifests import make_manifest, make_tiles
        from tilebridge_protocol.messages import decode_open
        manifest = decode_open({manifest.to_bytes()!r})
        buffer = DiskBuffer(Path({str(tmp_path)!r}))
        buffer.add_open(manifest)
        for key, pixels in make_tiles(manifest).items():
            buffer.add_tile(manifest.image_id, key, pixels.astype("<u2").tobytes())
        done = [buffer.next_item(1) for _ in range(3)]  # open + 2 tiles taken
        buffer.done(done[0]); buffer.done(done[1])       # open and one tile acknowledged
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parents[2], check=False
    )
    assert result.returncode == -9
    buffer = DiskBuffer(tmp_path)
    remaining = []
    while (item := buffer.next_item(0.05)) is not None:
        remaining.append(item)
    tiles = make_tiles(manifest)
    assert len(remaining) == manifest.tile_count - 1  # the taken-but-unacked tile came back
    for item in remaining:
        assert item.key is not None
        assert buffer.read_tile(manifest.image_id, item.key) == _bytes(tiles[item.key])
    # The acquisition program restarts and writes the same frames: nothing is taken twice.
    for key, pixels in tiles.items():
        assert not buffer.add_tile(manifest.image_id, key, _bytes(pixels))
    assert buffer.stats().tiles == manifest.tile_count - 1
    buffer.close()


def test_close_needs_every_tile_and_late_tiles_are_refused(tmp_path: Path) -> None:
    buffer = DiskBuffer(tmp_path)
    manifest = make_manifest(rows=1, columns=2)
    tiles = make_tiles(manifest)
    buffer.add_open(manifest)
    keys = list(tiles)
    for key in keys[:-1]:
        buffer.add_tile(manifest.image_id, key, _bytes(tiles[key]))
    with pytest.raises(PermanentError, match="1 tiles never written"):
        buffer.add_close(manifest.image_id)
    buffer.add_tile(manifest.image_id, keys[-1], _bytes(tiles[keys[-1]]))
    close = buffer.add_close(manifest.image_id)
    assert close.tile_count == manifest.tile_count
    with pytest.raises(PermanentError):
        buffer.add_tile(manifest.image_id, TileKey(99), _bytes(tiles[keys[0]]))
    buffer.close()


def test_a_frame_that_does_not_fit_the_disk_is_refused_without_damage(tmp_path: Path) -> None:
    buffer = DiskBuffer(tmp_path, min_free_bytes=1 << 62)  # nothing fits above this reserve
    manifest = make_manifest(rows=1, columns=1)
    with pytest.raises(TransientError, match="disk buffer full"):
        buffer.add_open(manifest)
    assert buffer.stats().tiles == 0
    buffer.close()


def test_a_manifest_cannot_change_under_the_same_image_id(tmp_path: Path) -> None:
    buffer = DiskBuffer(tmp_path)
    manifest = make_manifest()
    buffer.add_open(manifest)
    assert not buffer.add_open(manifest)
    with pytest.raises(PermanentError):
        buffer.add_open(make_manifest(image_id=manifest.image_id, image_name="other"))
    buffer.close()


def test_a_refused_frame_shows_on_the_device_status(tmp_path: Path) -> None:
    from edge_agent.agent import EdgeAgent
    from edge_agent.settings import AgentSettings

    manifest = make_manifest(rows=1, columns=1)
    agent = EdgeAgent(AgentSettings(spool_dir=tmp_path, min_free_bytes=0))  # never started
    agent.open_image(manifest)
    agent.buffer.min_free_bytes = 1 << 62  # the disk is now "full"
    key, pixels = next(iter(make_tiles(manifest).items()))
    with pytest.raises(TransientError):
        agent.write_tile(manifest.image_id, key, pixels)
    assert "disk buffer full" in (agent.status().last_error or "")
    agent.buffer.min_free_bytes = 0
    assert agent.write_tile(manifest.image_id, key, pixels)
    assert agent.status().last_error is None
    agent.buffer.close()

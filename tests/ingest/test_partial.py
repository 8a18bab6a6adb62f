"""Images that end with fewer tiles than their open declared, through the ingest's engine
(real staging, SQLite ledger, archive): partial (stopped early: stored, flagged incomplete)
and sparse (positions never planned: stored complete, not flagged), never confused; a close
that leaves out staged tiles drops them; a close contradicting the first one is a conflict.
docs/protocol.md, "Images with fewer tiles"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from ome_types import from_xml

from tests.ingest.harness import Harness, chunks, close_for, tiles_for
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    ErrorAck,
    ImageState,
    OpenManifest,
    TileAck,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.testing import make_manifest, ome_key_values

Tiles = dict[TileKey, np.ndarray[Any, Any]]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


def fresh() -> OpenManifest:
    return make_manifest(columns=3, rows=2, size_z=1, size_c=2, image_name="partial")


def send_tiles(harness: Harness, m: OpenManifest, tiles: Tiles) -> None:
    for key, pixels in tiles.items():
        for message in chunks(m, key, pixels):
            harness.send(DeviceTopic.CHUNK, message)


def closing(m: OpenManifest, tiles: Tiles, **fields: Any) -> CloseManifest:
    full = close_for(m, {**tiles_for(m), **tiles})
    digests = tuple(d for d in full.digests if d.tile in tiles)
    return CloseManifest(image_id=m.image_id, tile_count=len(digests), digests=digests, **fields)


def archive(path: str, m: OpenManifest) -> tuple[dict[int, np.ndarray[Any, Any]], dict[str, str]]:
    """position index -> (T, C, Z, Y, X) of each series; the image's key-values."""
    out = {}
    with tifffile.TiffFile(path) as tif:
        ome = from_xml(tif.ome_metadata or "")
        for image, series in zip(ome.images, tif.series, strict=True):
            index = int((image.name or "").rsplit(" ", 1)[1])
            shape = (m.size_t, m.size_c, m.size_z, m.tile_height, m.tile_width)
            out[index] = series.asarray().reshape(shape)
    return out, ome_key_values(ome)


def test_a_partial_image_is_stored_with_its_tiles_and_flagged_incomplete(
    harness: Harness,
) -> None:
    m = fresh()
    tiles = {k: v for k, v in tiles_for(m).items() if k.index < 4}  # stopped after 4 positions
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    send_tiles(harness, m, tiles)
    harness.send(DeviceTopic.CLOSE, closing(m, tiles, partial=True).to_bytes())
    ack = harness.recorder.wait_image_ack(m.image_id)
    assert ack.state is ImageState.COMPLETE
    series, kv = archive(ack.locations["archive"], m)
    assert sorted(series) == [0, 1, 2, 3]  # no series for the positions never taken
    for key, pixels in tiles.items():
        np.testing.assert_array_equal(series[key.index][key.t, key.c, key.z], pixels)
    assert kv["tilebridge.incomplete"] == "true" and kv["tilebridge.tiles"] == "8/12"
    status = harness.recorder.statuses[-1]
    assert status.phase.value == "complete" and status.incomplete
    assert (status.tiles_total, status.tiles_stored, status.tiles_not_planned) == (12, 8, 0)
    # A repeated partial close is answered the same; a full one now is a conflict.
    harness.send(DeviceTopic.CLOSE, closing(m, tiles, partial=True).to_bytes())
    assert harness.recorder.acks[-1][1] == ack
    harness.send(DeviceTopic.CLOSE, close_for(m, tiles_for(m)).to_bytes())
    _, refusal = harness.recorder.acks[-1]
    assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.CONFLICT


def test_a_sparse_image_is_complete_and_not_flagged(harness: Harness) -> None:
    m = fresh()
    tiles = {k: v for k, v in tiles_for(m).items() if k.index not in (0, 2)}  # two corners
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    send_tiles(harness, m, tiles)
    harness.send(DeviceTopic.CLOSE, closing(m, tiles, not_planned=(0, 2)).to_bytes())
    ack = harness.recorder.wait_image_ack(m.image_id)
    assert ack.state is ImageState.COMPLETE
    series, kv = archive(ack.locations["archive"], m)
    assert sorted(series) == [1, 3, 4, 5]
    assert "tilebridge.incomplete" not in kv and kv["tilebridge.not_planned"] == "0, 2"
    status = harness.recorder.statuses[-1]
    assert not status.incomplete
    assert (status.tiles_stored, status.tiles_not_planned) == (8, 4)


def test_a_close_that_leaves_out_staged_tiles_drops_them(harness: Harness) -> None:
    m = fresh()
    every = tiles_for(m)
    kept = {k: v for k, v in every.items() if k.index != 5}
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    send_tiles(harness, m, every)  # every tile staged, then the close leaves position 5 out
    harness.send(DeviceTopic.CLOSE, closing(m, kept, partial=True).to_bytes())
    ack = harness.recorder.wait_image_ack(m.image_id)
    series, kv = archive(ack.locations["archive"], m)
    assert 5 not in series and kv["tilebridge.tiles"] == "10/12"


def test_a_tile_the_close_does_not_list_is_refused_after_it(harness: Harness) -> None:
    m = fresh()
    every = tiles_for(m)
    first = {k: v for k, v in every.items() if k.index == 0}
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    harness.send(DeviceTopic.CLOSE, closing(m, first, partial=True).to_bytes())  # still receiving
    stray = TileKey(1, 0, 0, 0)
    harness.send(DeviceTopic.CHUNK, chunks(m, stray, every[stray])[0])
    _, refusal = harness.recorder.acks[-1]
    assert isinstance(refusal, TileAck) and refusal.state is TileState.REJECTED
    assert refusal.reason is ReasonCode.OUT_OF_RANGE
    send_tiles(harness, m, first)
    assert harness.recorder.wait_image_ack(m.image_id).state is ImageState.COMPLETE


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({}, "without partial: true"),
        ({"partial": True, "not_planned": (9,)}, "the open has 6"),
    ],
)
def test_a_close_that_does_not_fit_the_open_is_refused(
    harness: Harness, fields: dict[str, Any], problem: str
) -> None:
    m = fresh()
    harness.send(DeviceTopic.OPEN, m.to_bytes())
    some = {k: v for k, v in tiles_for(m).items() if k.index == 1}
    harness.send(DeviceTopic.CLOSE, closing(m, some, **fields).to_bytes())
    _, refusal = harness.recorder.acks[-1]
    assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.INVALID_MANIFEST
    assert problem in refusal.detail


def test_a_partial_image_closed_before_its_last_tile_completes_after_a_restart(
    tmp_path: Path,
) -> None:
    """Positions 0, 1 and 5 are staged; the close lists 0, 1 and 2 (5 is dropped, 2 still
    coming); the ingest restarts: what it loads is what the close lists, and the last tiles
    complete the image."""
    m = fresh()
    every = tiles_for(m)
    listed = {k: v for k, v in every.items() if k.index in (0, 1, 2)}
    first = Harness(tmp_path)
    first.send(DeviceTopic.OPEN, m.to_bytes())
    send_tiles(first, m, {k: v for k, v in every.items() if k.index in (0, 1, 5)})
    first.send(DeviceTopic.CLOSE, closing(m, listed, partial=True).to_bytes())
    first.close()
    assert first.phase(m.image_id)[0] == "receiving"
    second = Harness(tmp_path)
    try:
        send_tiles(second, m, {k: v for k, v in listed.items() if k.index == 2})
        ack = second.recorder.wait_image_ack(m.image_id)
        assert ack.state is ImageState.COMPLETE
        series, kv = archive(ack.locations["archive"], m)
        assert sorted(series) == [0, 1, 2] and kv["tilebridge.tiles"] == "6/12"
    finally:
        second.close()

"""The preview level, pure: the f x f block means of the committed part of the stitched
preview plane, whatever order the tiles come in; a PNG with the rest transparent."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from server_ingest.preview import PreviewLevel
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.mosaic import plan
from tilebridge_storage.testing.manifests import make_manifest, make_tiles


def expected(manifest: OpenManifest, tiles: dict[int, Any], factor: int) -> np.ndarray[Any, Any]:
    """Block means over the committed pixels of the stitched plane (NaN: none committed)."""
    mosaic = plan(manifest)
    canvas = np.zeros((mosaic.height, mosaic.width))
    covered = np.zeros(canvas.shape, bool)
    for piece in mosaic.pieces:
        if piece.index in tiles:
            canvas[piece.canvas.slices] = tiles[piece.index][piece.tile.slices]
            covered[piece.canvas.slices] = True
    h, w = -(-canvas.shape[0] // factor), -(-canvas.shape[1] // factor)
    out = np.full((h, w), np.nan)
    for by in range(h):
        for bx in range(w):
            block = np.s_[by * factor : (by + 1) * factor, bx * factor : (bx + 1) * factor]
            if covered[block].any():
                out[by, bx] = canvas[block][covered[block]].mean()
    return out


def level_means(level: PreviewLevel) -> np.ndarray[Any, Any]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(level.counts > 0, level.sums / level.counts, np.nan)


def test_the_level_is_the_block_mean_of_what_is_committed() -> None:
    # Overlapping tiles at non-block-aligned offsets: pieces cut blocks in two.
    m = make_manifest(
        rows=3, columns=4, tile=(50, 50), overlap=0.13, size_z=1, size_c=1, channels=["A"]
    )
    tiles = {k.index: v for k, v in make_tiles(m).items()}
    level = PreviewLevel(m, max_px=40)
    assert level.factor == 8 and max(level.sums.shape) <= 40
    order = [5, 0, 11, 3]
    for index in order:
        level.add(index, tiles[index])
    np.testing.assert_allclose(
        level_means(level), expected(m, {i: tiles[i] for i in order}, 8), equal_nan=True
    )
    for index in sorted(set(tiles) - set(order)):
        level.add(index, tiles[index])
    np.testing.assert_allclose(level_means(level), expected(m, tiles, 8))


def test_the_png_is_stretched_to_the_committed_range_and_clear_elsewhere() -> None:
    m = make_manifest(rows=1, columns=2, tile=(32, 32), size_z=1, size_c=1, channels=["A"])
    tiles = {k.index: v for k, v in make_tiles(m).items()}
    level = PreviewLevel(m, max_px=1024)
    level.add(0, tiles[0])
    image = np.asarray(Image.open(io.BytesIO(level.png())))
    assert image.shape == (*level.sums.shape, 2)
    grey, alpha = image[..., 0], image[..., 1]
    shown = level.counts > 0
    assert (alpha[shown] == 255).all() and (alpha[~shown] == 0).all()
    assert grey[shown].min() == 0 and grey[shown].max() == 255

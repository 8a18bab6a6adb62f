from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from tilebridge_protocol.messages import OpenManifest, PixelSize, StagePosition
from tilebridge_storage.mosaic import Rect, assemble, downsample, plan, pyramid_shapes
from tilebridge_storage.testing.contract import Tiles
from tilebridge_storage.testing.manifests import make_manifest


def manifest(
    positions: list[tuple[float, float]], tile: tuple[int, int], pixel_um: float = 1.0
) -> OpenManifest:
    """positions as (y_um, x_um) by index; tile as (height, width)."""
    return make_manifest(
        tile=tile,
        size_z=1,
        size_c=1,
        channels=[],
        positions=[StagePosition(index=i, x_um=x, y_um=y) for i, (y, x) in enumerate(positions)],
        pixel_size=PixelSize(x_um=pixel_um, y_um=pixel_um),
    )


def plane_of(manifest: OpenManifest, tiles: Tiles, t: int, c: int, z: int) -> Any:
    """The expected canvas of plane (t, c, z) of a contract image."""
    plane = {k.index: v for k, v in tiles.items() if (k.t, k.c, k.z) == (t, c, z)}
    return assemble(manifest, plane)


def owned(m: OpenManifest) -> dict[int, list[tuple[Rect, Rect]]]:
    mosaic = plan(m)
    return {i: [(p.canvas, p.tile) for p in mosaic.pieces_of(i)] for i in range(len(m.positions))}


def labels(m: OpenManifest) -> np.ndarray[Any, Any]:
    """The canvas with each pixel showing (its tile index + 1)."""
    tiles = {
        i: np.full((m.tile_height, m.tile_width), i + 1, np.uint16) for i in range(len(m.positions))
    }
    return assemble(m, tiles)


def nearest_centre(m: OpenManifest) -> np.ndarray[Any, Any]:
    """Brute force of the grid rule: per pixel, the covering tile with the nearest centre."""
    mosaic = plan(m)
    best = np.full((mosaic.height, mosaic.width), np.inf)
    out = np.zeros((mosaic.height, mosaic.width), np.uint16)
    yy, xx = np.mgrid[0 : mosaic.height, 0 : mosaic.width] + 0.5
    for i, (oy, ox) in enumerate(mosaic.offsets):
        d = (yy - oy - m.tile_height / 2) ** 2 + (xx - ox - m.tile_width / 2) ** 2
        cover = (yy > oy) & (yy < oy + m.tile_height) & (xx > ox) & (xx < ox + m.tile_width)
        win = cover & (d < best)  # strict: on a tie the earlier (lower) index stays
        best[win], out[win] = d[win], i + 1
    return out


def reverse_painted(m: OpenManifest) -> np.ndarray[Any, Any]:
    """Brute force of the fallback rule: whole tiles painted from the highest index down."""
    mosaic = plan(m)
    out = np.zeros((mosaic.height, mosaic.width), np.uint16)
    for i in reversed(range(len(m.positions))):
        oy, ox = mosaic.offsets[i]
        out[oy : oy + m.tile_height, ox : ox + m.tile_width] = i + 1
    return out


def test_2x2_grid_with_10_percent_overlap() -> None:
    # 10 x 20 tiles, steps 9 and 18 px: a 1-px seam in y (a tie), a 2-px one in x (split).
    m = manifest([(0, 0), (0, 18), (9, 0), (9, 18)], tile=(10, 20))
    mosaic = plan(m)
    assert (mosaic.height, mosaic.width) == (19, 38)
    assert mosaic.offsets == ((0, 0), (0, 18), (9, 0), (9, 18))
    assert mosaic.grid
    assert owned(m) == {
        0: [(Rect(0, 10, 0, 19), Rect(0, 10, 0, 19))],
        1: [(Rect(0, 10, 19, 38), Rect(0, 10, 1, 20))],
        2: [(Rect(10, 19, 0, 19), Rect(1, 10, 0, 19))],
        3: [(Rect(10, 19, 19, 38), Rect(1, 10, 1, 20))],
    }


def test_snake_scan_ties_go_to_the_lower_index() -> None:
    # 10 x 10 tiles, step 9: tied seams; row 1 runs right to left (indices 2, 3).
    m = manifest([(0, 0), (0, 9), (9, 9), (9, 0)], tile=(10, 10))
    assert owned(m) == {
        0: [(Rect(0, 10, 0, 10), Rect(0, 10, 0, 10))],
        1: [(Rect(0, 10, 10, 19), Rect(0, 10, 1, 10))],
        2: [(Rect(10, 19, 9, 19), Rect(1, 10, 0, 10))],
        3: [(Rect(10, 19, 0, 9), Rect(1, 10, 0, 9))],
    }
    np.testing.assert_array_equal(labels(m), nearest_centre(m))


def test_origin_is_the_smallest_position_and_offsets_round() -> None:
    # pixel 0.5 um; x = -3.2 -> origin; 10.3 um further is 20.6 px -> 21.
    m = manifest([(7.0, 7.1), (2.0, -3.2)], tile=(4, 30), pixel_um=0.5)
    mosaic = plan(m)
    assert (mosaic.origin_y_um, mosaic.origin_x_um) == (2.0, -3.2)
    assert mosaic.offsets == ((10, 21), (0, 0))
    assert (mosaic.height, mosaic.width) == (14, 51)


def test_non_grid_positions_lower_index_wins() -> None:
    m = manifest([(0, 0), (5, 8), (0, 16)], tile=(10, 10))
    mosaic = plan(m)
    assert not mosaic.grid
    assert (mosaic.height, mosaic.width) == (15, 26)
    assert owned(m) == {
        0: [(Rect(0, 10, 0, 10), Rect(0, 10, 0, 10))],
        1: [
            (Rect(5, 10, 10, 18), Rect(0, 5, 2, 10)),
            (Rect(10, 15, 8, 18), Rect(5, 10, 0, 10)),
        ],
        2: [
            (Rect(0, 5, 16, 26), Rect(0, 5, 0, 10)),
            (Rect(5, 10, 18, 26), Rect(5, 10, 2, 10)),
        ],
    }
    np.testing.assert_array_equal(labels(m), reverse_painted(m))


def test_gaps_stay_empty_and_hidden_duplicates_own_nothing() -> None:
    # columns 15 px apart with 10-px tiles: a 5-px gap; index 2 repeats index 0's position.
    m = manifest([(0, 0), (0, 15), (0, 0)], tile=(10, 10))
    mosaic = plan(m)
    assert mosaic.grid
    assert mosaic.pieces_of(2) == ()
    canvas = labels(m)
    assert (canvas[:, 10:15] == 0).all()
    np.testing.assert_array_equal(canvas, nearest_centre(m))


@pytest.mark.parametrize("seed", range(30))
def test_random_grids_match_brute_force_nearest_centre(seed: int) -> None:
    rng = random.Random(seed)
    height, width = rng.randint(3, 12), rng.randint(3, 12)
    ys = sorted(rng.sample(range(0, 30), rng.randint(1, 4)))
    xs = sorted(rng.sample(range(0, 30), rng.randint(1, 4)))
    cells = [(y, x) for y in ys for x in xs]
    cells += rng.choices(cells, k=rng.randint(0, 2))
    rng.shuffle(cells)
    m = manifest(cells, tile=(height, width))
    assert plan(m).grid
    np.testing.assert_array_equal(labels(m), nearest_centre(m))


@pytest.mark.parametrize("seed", range(30))
def test_random_positions_match_reverse_painting(seed: int) -> None:
    rng = random.Random(seed)
    positions = [(rng.uniform(0, 25), rng.uniform(0, 25)) for _ in range(rng.randint(2, 7))]
    m = manifest(positions, tile=(rng.randint(3, 12), rng.randint(3, 12)), pixel_um=0.7)
    if not plan(m).grid:
        np.testing.assert_array_equal(labels(m), reverse_painted(m))


def test_pieces_partition_the_covered_canvas() -> None:
    m = make_manifest()  # the contract's 3 x 2 grid
    mosaic = plan(m)
    count = np.zeros((mosaic.height, mosaic.width), int)
    for piece in mosaic.pieces:
        count[piece.canvas.slices] += 1
        assert piece.canvas.y1 - piece.canvas.y0 == piece.tile.y1 - piece.tile.y0
        assert piece.canvas.x1 - piece.canvas.x0 == piece.tile.x1 - piece.tile.x0
    assert (count == 1).all()


def test_bands_name_the_tiles_they_need() -> None:
    m = manifest([(0, 0), (0, 18), (9, 0), (9, 18)], tile=(10, 20))
    mosaic = plan(m)
    assert mosaic.tiles_in_band(0, 5) == [0, 1]
    assert mosaic.tiles_in_band(9, 11) == [0, 1, 2, 3]
    assert mosaic.tiles_in_band(10, 19) == [2, 3]
    assert mosaic.tiles_in_band(19, 30) == []
    # Painting band by band gives the assembled canvas.
    tiles = {i: np.random.default_rng(i).integers(0, 999, (10, 20)) for i in range(4)}
    canvas = np.zeros((mosaic.height, mosaic.width), int)
    for y0 in range(0, mosaic.height, 4):
        for piece in mosaic.band(y0, y0 + 4):
            assert y0 <= piece.canvas.y0 < piece.canvas.y1 <= y0 + 4
            canvas[piece.canvas.slices] = tiles[piece.index][piece.tile.slices]
    np.testing.assert_array_equal(canvas, assemble(m, tiles))


def test_pyramid_halves_until_one_tile() -> None:
    assert pyramid_shapes(91, 179, 32) == [(91, 179), (46, 90), (23, 45), (12, 23)]
    assert pyramid_shapes(20, 20, 32) == [(20, 20)]


def test_downsample_is_a_2x2_mean() -> None:
    block = np.array([[0, 2, 10], [2, 4, 20], [7, 7, 1]], np.uint16)
    # odd edges average with themselves: (10 + 20) / 2, (7 + 7) / 2, 1
    np.testing.assert_array_equal(downsample(block), [[2, 15], [7, 1]])
    assert downsample(block).dtype == np.uint16
    floats = np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)
    assert downsample(floats).tolist() == [[0.75]]

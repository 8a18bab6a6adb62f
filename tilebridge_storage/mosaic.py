"""Where each tile of a mosaic goes on the canvas, and which tile shows where tiles overlap.

Pure logic with no I/O of its own, shared by the mosaic backends (OME-Zarr, stitched TIFF,
OMERO): the layout, the ownership rule, band queries, and 2x2-mean pyramid helpers.

Placement: a stage position names the top-left corner of its tile. The canvas origin is the
smallest stage x and y; tile `i` starts at pixel `round((x_um - min_x) / pixel_size.x_um)`
(likewise y), and the canvas just covers every tile. Pixels no tile covers stay 0, and so
does the area a tile owns when the image does not hold it (a sparse or partial image): the
plan is the manifest's, whichever tiles arrive.

Ownership: every canvas pixel shows exactly one tile, decided by the pixel alone, never by
arrival order, so a canvas painted tile by tile as tiles arrive equals one assembled at the
end. Each tile owns a few disjoint rectangles (`Piece`s):

* Grid scans (the distinct tile offsets form a full rectilinear grid: every column x row
  has a tile, as in raster and snake scans): a pixel belongs to the covering tile whose
  centre is nearest (pixel centres, Euclidean), ties to the lower tile index. On a full grid
  the nearest centre is the nearest column and the nearest row, so this is exact with
  rectangles: one per tile in raster and snake scans (an odd overlap leaves a one-pixel tie
  seam that goes to the lower index; unusual index orders may split a tile in a few).
* Anything else (irregular positions, a grid with holes, stage jitter that moves a tile
  off the grid by a pixel): the lower tile index wins, i.e. each tile owns its rectangle
  minus the rectangles of lower-indexed tiles, as if painted in reverse index order. Exact
  nearest-centre areas would be polygons; this keeps every owned area rectangular.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import Layout, OpenManifest


class Rect(NamedTuple):
    """Half-open pixel rectangle `[y0, y1) x [x0, x1)`."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of tile `index` shown on the canvas: `canvas` is where, `tile` the same pixels
    in the tile's own coordinates."""

    index: int
    canvas: Rect
    tile: Rect


@dataclass(frozen=True)
class Mosaic:
    height: int
    width: int
    origin_y_um: float
    origin_x_um: float
    offsets: tuple[tuple[int, int], ...]
    """(y, x) pixel offset of each tile's top-left corner, by position index."""
    grid: bool
    """True when ownership is nearest-centre (a full grid), False for lower-index-wins."""
    pieces: tuple[Piece, ...]
    """Every owned rectangle, sorted by canvas row (for band queries)."""
    tile_height: int
    _by_index: dict[int, tuple[Piece, ...]] = field(repr=False, compare=False)
    _starts: list[int] = field(repr=False, compare=False)

    def pieces_of(self, index: int) -> tuple[Piece, ...]:
        """Where tile `index` shows; empty when other tiles hide it entirely."""
        return self._by_index.get(index, ())

    def band(self, y0: int, y1: int) -> list[Piece]:
        """The pieces that paint canvas rows `[y0, y1)`, clipped to those rows."""
        # A piece is at most one tile high, so only pieces starting in this window can reach.
        lo = bisect.bisect_left(self._starts, y0 - self.tile_height + 1)
        hi = bisect.bisect_left(self._starts, y1)
        out = []
        for piece in self.pieces[lo:hi]:
            c = piece.canvas
            top, bottom = max(c.y0, y0), min(c.y1, y1)
            if top < bottom:
                dy = piece.tile.y0 - c.y0
                out.append(
                    Piece(
                        piece.index,
                        Rect(top, bottom, c.x0, c.x1),
                        Rect(top + dy, bottom + dy, piece.tile.x0, piece.tile.x1),
                    )
                )
        return out

    def tiles_in_band(self, y0: int, y1: int) -> list[int]:
        """Position indices whose pixels show in canvas rows `[y0, y1)`: once these tiles
        (of a plane) are present, the band can be written."""
        return sorted({piece.index for piece in self.band(y0, y1)})


def require_mosaic(manifest: OpenManifest, backend: str) -> None:
    # A per-tile image asks for its positions kept apart; stitching them would not be it.
    if manifest.layout is not Layout.MOSAIC:
        raise PermanentError(
            f"image {manifest.image_id} has layout {manifest.layout.value}; "
            f"the {backend} backend stores mosaics only"
        )


def plan(manifest: OpenManifest) -> Mosaic:
    """Lay out the manifest's tiles; see the module docstring for the rules."""
    m = manifest
    min_x = min(p.x_um for p in m.positions)
    min_y = min(p.y_um for p in m.positions)
    offsets = [(0, 0)] * len(m.positions)
    for p in m.positions:
        offsets[p.index] = (
            round((p.y_um - min_y) / m.pixel_size.y_um),
            round((p.x_um - min_x) / m.pixel_size.x_um),
        )
    size = (m.tile_height, m.tile_width)
    grid = _is_full_grid(offsets)
    cells = _grid_cells(offsets, size) if grid else _lower_index_cells(offsets, size)
    pieces = []
    for index, rects in cells.items():
        oy, ox = offsets[index]
        for r in _merge(rects):
            pieces.append(Piece(index, r, Rect(r.y0 - oy, r.y1 - oy, r.x0 - ox, r.x1 - ox)))
    pieces.sort(key=lambda p: (p.canvas.y0, p.canvas.x0))
    by_index: dict[int, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_index[piece.index].append(piece)
    return Mosaic(
        height=max(y for y, _ in offsets) + m.tile_height,
        width=max(x for _, x in offsets) + m.tile_width,
        origin_y_um=min_y,
        origin_x_um=min_x,
        offsets=tuple(offsets),
        grid=grid,
        pieces=tuple(pieces),
        tile_height=m.tile_height,
        _by_index={i: tuple(p) for i, p in by_index.items()},
        _starts=[p.canvas.y0 for p in pieces],
    )


def assemble(
    manifest: OpenManifest, tiles_for_plane: Mapping[int, np.ndarray[Any, Any]]
) -> np.ndarray[Any, Any]:
    """The canvas of one plane, from position index -> tile (for tests and small images).
    A position without a tile leaves the area it owns 0 (see the module docstring)."""
    mosaic = plan(manifest)
    canvas = np.zeros((mosaic.height, mosaic.width), manifest.dtype.numpy.newbyteorder("="))
    for piece in mosaic.pieces:
        tile = tiles_for_plane.get(piece.index)
        if tile is not None:
            canvas[piece.canvas.slices] = tile[piece.tile.slices]
    return canvas


CHUNK = 512
"""Side of the square chunks a viewer loads one at a time (the NGFF 0.4 live store's): what
ImSwitch's live view is told a frame painted (`chunks_of`)."""


def chunks_of(mosaic: Mosaic, index: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(row, column) of every level-0 chunk that tile `index` paints."""
    out: set[tuple[int, int]] = set()
    for piece in mosaic.pieces_of(index):
        c = piece.canvas
        for row in range(c.y0 // chunk, (c.y1 - 1) // chunk + 1):
            out.update((row, col) for col in range(c.x0 // chunk, (c.x1 - 1) // chunk + 1))
    return sorted(out)


def pyramid_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) per level: each half the previous (rounded up) until one fits a tile."""
    shapes = [(height, width)]
    while height > tile or width > tile:
        height, width = -(-height // 2), -(-width // 2)
        shapes.append((height, width))
    return shapes


def downsample(block: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """2x2 mean of a 2-D block (an odd last row/column is averaged with itself)."""
    if block.shape[0] % 2:
        block = np.concatenate([block, block[-1:]], axis=0)
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], axis=1)
    total = block[0::2, 0::2].astype(np.float64)
    total += block[1::2, 0::2]
    total += block[0::2, 1::2]
    total += block[1::2, 1::2]
    total /= 4
    if block.dtype.kind in "ui":
        np.rint(total, out=total)
    return total.astype(block.dtype)


def downsample_level(source: Any, target: Any, block: int) -> None:
    """Fill `target` (..., h, w) with the 2x2 mean of `source` (..., 2h or 2h - 1, ...), one
    `block` x `block` piece of `target` at a time, so memory stays at four blocks whatever
    the image size. Takes numpy arrays, memory maps and zarr arrays alike."""
    *planes, height, width = target.shape
    for plane in np.ndindex(*planes):
        for y in range(0, height, block):
            for x in range(0, width, block):
                rows, columns = slice(2 * y, 2 * (y + block)), slice(2 * x, 2 * (x + block))
                small = downsample(np.asarray(source[(*plane, rows, columns)]))
                rows, columns = slice(y, y + small.shape[0]), slice(x, x + small.shape[1])
                target[(*plane, rows, columns)] = small


def _is_full_grid(offsets: list[tuple[int, int]]) -> bool:
    distinct = set(offsets)
    rows = {y for y, _ in distinct}
    columns = {x for _, x in distinct}
    return len(distinct) == len(rows) * len(columns)


class _Span(NamedTuple):
    start: int
    stop: int
    members: tuple[int, ...]
    """Indices (into the sorted axis offsets) of the nearest columns: one, or two on a tie."""


def _axis_spans(starts: list[int], size: int) -> list[_Span]:
    """Split one axis into spans with the same nearest tile column(s), covered pixels only.

    Pixel p (centre p + 1/2) is nearer column i than i + 1 iff 2p + 1 < s, with
    s = starts[i] + starts[i + 1] + size (centres doubled to stay in integers). A pixel its
    nearest column does not cover is covered by no column, so clipping to coverage is exact.
    """
    spans = []
    lo = starts[0]
    for i, start in enumerate(starts):
        if i + 1 < len(starts):
            s = start + starts[i + 1] + size
            hi, tie, next_lo = (
                (s // 2, None, s // 2) if s % 2 == 0 else (s // 2, s // 2, s // 2 + 1)
            )
        else:
            hi, tie, next_lo = start + size, None, 0
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            spans.append(_Span(a, b, (i,)))
        if tie is not None and starts[i + 1] <= tie < start + size:
            spans.append(_Span(tie, tie + 1, (i, i + 1)))
        lo = next_lo
    return spans


def _grid_cells(offsets: list[tuple[int, int]], size: tuple[int, int]) -> dict[int, list[Rect]]:
    rows = sorted({y for y, _ in offsets})
    columns = sorted({x for _, x in offsets})
    row_of = {y: i for i, y in enumerate(rows)}
    column_of = {x: i for i, x in enumerate(columns)}
    # Repeated stage positions: the lower index is the one nearest, by the tie rule.
    at: dict[tuple[int, int], int] = {}
    for index, (y, x) in enumerate(offsets):
        at.setdefault((row_of[y], column_of[x]), index)
    cells: dict[int, list[Rect]] = defaultdict(list)
    x_spans = _axis_spans(columns, size[1])
    for ys in _axis_spans(rows, size[0]):
        for xs in x_spans:
            owner = min(at[r, c] for r in ys.members for c in xs.members)
            cells[owner].append(Rect(ys.start, ys.stop, xs.start, xs.stop))
    return cells


def _lower_index_cells(
    offsets: list[tuple[int, int]], size: tuple[int, int]
) -> dict[int, list[Rect]]:
    height, width = size
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (y, x) in enumerate(offsets):
        buckets[y // height, x // width].append(index)
    cells: dict[int, list[Rect]] = {}
    for index, (y, x) in enumerate(offsets):
        own = Rect(y, y + height, x, x + width)
        by, bx = y // height, x // width
        # Overlapping tiles start less than a tile away, so they sit in adjacent buckets.
        hiding = [
            _rect(offsets[j], size)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            for j in buckets.get((by + dy, bx + dx), ())
            if j < index and _overlap(own, _rect(offsets[j], size))
        ]
        cells[index] = _subtract(own, hiding)
    return cells


def _rect(offset: tuple[int, int], size: tuple[int, int]) -> Rect:
    return Rect(offset[0], offset[0] + size[0], offset[1], offset[1] + size[1])


def _overlap(a: Rect, b: Rect) -> bool:
    return a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1


def _subtract(own: Rect, hiding: list[Rect]) -> list[Rect]:
    """`own` minus the union of `hiding`, as cells of the grid their edges cut `own` into."""
    ys = sorted({own.y0, own.y1} | {min(max(v, own.y0), own.y1) for r in hiding for v in r[:2]})
    xs = sorted({own.x0, own.x1} | {min(max(v, own.x0), own.x1) for r in hiding for v in r[2:]})
    out = []
    for y0, y1 in pairwise(ys):
        for x0, x1 in pairwise(xs):
            if not any(r.y0 <= y0 < r.y1 and r.x0 <= x0 < r.x1 for r in hiding):
                out.append(Rect(y0, y1, x0, x1))
    return out


def _merge(rects: Iterable[Rect]) -> list[Rect]:
    """Fewer, larger rectangles covering the same disjoint cells: runs within each row band,
    then equal runs of consecutive bands."""
    rows: dict[tuple[int, int], list[Rect]] = defaultdict(list)
    for r in rects:
        rows[r.y0, r.y1].append(r)
    runs: list[Rect] = []
    for band in sorted(rows):
        for r in sorted(rows[band], key=lambda r: r.x0):
            last = runs[-1] if runs else None
            if last is not None and (last.y0, last.y1) == band and last.x1 == r.x0:
                runs[-1] = last._replace(x1=r.x1)
            else:
                runs.append(r)
    merged: list[Rect] = []
    for r in sorted(runs, key=lambda r: (r.x0, r.x1, r.y0)):
        last = merged[-1] if merged else None
        if last is not None and (last.x0, last.x1) == (r.x0, r.x1) and last.y1 == r.y0:
            merged[-1] = last._replace(y1=r.y1)
        else:
            merged.append(r)
    return merged

"""Writing one OMERO image's pixels band by band, while the camera tiles are still arriving.

A band is one row of OMERO tiles of one plane (`getTileSize()` rows high, the image's full
width). Its pixels come from the camera tiles that show in those rows (`Source.band`, the
mosaic's ownership rule), so a band can be written as soon as those tiles of its plane have
arrived, and only one band is ever assembled in memory.

* Pyramid images (big planes) accept their tiles in ONE sequential pass in ONE store:
  planes in XYZCT order (z fastest, then c, then t), rows of tiles top to bottom, tiles left
  to right. The sink keeps a cursor on that order and writes every band that is ready from
  it on; a band whose tiles are missing holds back all later ones.
* Small ("ROMIO") images accept full-width stripes in any order, so any ready band is
  written at once.

A tile the image does not hold (`expect`: a sparse or partial image) is never waited for:
once the sink is told what is held (`held`), its area of a band stays 0 and `advance`
writes every band that was waiting only for it, still in the one pass.

Per-channel min/max is tracked over what is written and set after `save()`.

Verification (`digest`, `read_digest`): OMERO's `RawPixelsStore.calculateMessageDigest` is a
SHA-1 over the image's planes in XYZCT order (z fastest, then c, then t), each plane's rows
top to bottom, big-endian samples: ome/omero-romio's `RomioPixelBuffer` digests
`getPlane(z, c, t)` in that order from its big-endian file, and a pyramid's
`BfPyramidPixelBuffer` hands the digest to a `BfPixelBuffer` over its TIFF, whose
`BfPixelsWrapper.getMessageDigest` digests every timepoint of it; that TIFF holds one plane
per "timepoint" in the same order (`getRasterizedT`: t * C * Z + c * Z + z) and is written
big-endian (`setPixelsBigEndian`, the buffer's default byte order). The sink computes the
same SHA-1 of what it means to write: a pyramid's bands go out in exactly that order, so it
is digested while writing; a small image's bands go out in any order, so its digest is made
at the end from the tiles it was given (`load`), composed again band by band.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.mosaic import Piece, Rect
from tilebridge_storage.omero_backend._omero import omero
from tilebridge_storage.omero_backend.session import OmeroSession

log = logging.getLogger(__name__)

Plane = tuple[int, int, int]
"""(z, c, t)"""


class Source(Protocol):
    """Where an OMERO image's pixels come from: a `mosaic.Mosaic`, or `OneTile`."""

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    def band(self, y0: int, y1: int) -> list[Piece]: ...


@dataclass(frozen=True)
class OneTile:
    """A per_tile image: the whole of one camera tile."""

    index: int
    height: int
    width: int

    def band(self, y0: int, y1: int) -> list[Piece]:
        rows = Rect(y0, y1, 0, self.width)
        return [Piece(self.index, rows, rows)]


class PixelSink:
    """The pixels of one OMERO image; `offer` after each new tile, `save` once complete."""

    def __init__(
        self,
        session: OmeroSession,
        pixels_id: int,
        source: Source,
        indices: list[int],
        manifest: OpenManifest,
        tiles: MutableMapping[TileKey, np.ndarray[Any, Any]],
        max_call_bytes: int,
    ) -> None:
        m = manifest
        self.session = session
        self.pixels_id = pixels_id
        self.source = source
        self.indices = indices
        """Every position index this image is made of (their tiles are dropped per plane)."""
        self.tiles = tiles
        self.max_call_bytes = max_call_bytes
        self.dtype = m.dtype.numpy.newbyteorder("=")
        self.planes: list[Plane] = [
            (z, c, t) for t in range(m.size_t) for c in range(m.size_c) for z in range(m.size_z)
        ]
        self._plane_of = {plane: i for i, plane in enumerate(self.planes)}
        self.rps: Any = None
        self.pyramid = False
        self.tile_width = source.width
        self.bands: list[tuple[int, int]] = []
        self.pieces: list[list[Piece]] = []
        self.needs: list[list[int]] = []
        self.written: list[set[int]] = [set() for _ in self.planes]
        self.cursor = 0
        """Pyramids: the next band in write order, as plane * len(bands) + band."""
        self.ranges: dict[int, tuple[float, float]] = {}
        self.saved = False
        self._sha1 = hashlib.sha1()
        """Pyramids: the digest of every band written so far, in OMERO's order."""
        self.held: Callable[[TileKey], bool] = lambda key: True
        """Whether the image holds a tile (set by the writer's `expect`)."""

    # -- writing -------------------------------------------------------------------------
    def offer(self, key: TileKey | None) -> None:
        """Write every band that tile `key` (now in `tiles`) made ready, as the rules allow."""
        if self.rps is None:
            self._open()
        if self.pyramid:
            total = len(self.planes) * len(self.bands)
            while self.cursor < total:
                plane, band = divmod(self.cursor, len(self.bands))
                if not self._ready(plane, band):
                    return
                self._write(plane, band)
                self.cursor += 1
        elif key is not None:
            plane = self._plane_of[(key.z, key.c, key.t)]
            for band in range(len(self.bands)):
                if band not in self.written[plane] and self._ready(plane, band):
                    self._write(plane, band)

    def advance(self) -> None:
        """Write every band that is ready now (after `held` changed)."""
        if self.rps is None:
            self._open()
        if self.pyramid:
            self.offer(None)
            return
        for plane in range(len(self.planes)):
            for band in range(len(self.bands)):
                if band not in self.written[plane] and self._ready(plane, band):
                    self._write(plane, band)

    @property
    def complete(self) -> bool:
        return bool(self.bands) and all(len(w) == len(self.bands) for w in self.written)

    def save(self) -> None:
        """End the write (OMERO builds the pyramid now) and set each channel's min/max."""
        if self.saved:
            return
        self.rps.save()
        self.rps.close()
        self.rps = None
        for c, (low, high) in sorted(self.ranges.items()):
            self.session.pixels.setChannelGlobalMinMax(self.pixels_id, c, low, high)
        self.saved = True

    def close(self) -> None:
        """Give up the store (abort); errors are moot, the image is deleted anyway."""
        rps, self.rps = self.rps, None
        if rps is not None:
            try:
                rps.close()
            except Exception as exc:
                log.debug("closing a RawPixelsStore failed: %s", type(exc).__name__)

    # -- internals -----------------------------------------------------------------------
    def _open(self) -> None:
        rps = self.session.raw_pixels_store()
        self.rps = rps
        rps.setPixelsId(self.pixels_id, True)
        self.pyramid = bool(rps.requiresPixelsPyramid())
        tile_width, tile_height = (int(v) for v in rps.getTileSize())
        row_bytes = self.source.width * self.dtype.itemsize
        if self.pyramid:
            if tile_width * tile_height * self.dtype.itemsize > self.max_call_bytes:
                raise PermanentError(
                    f"OMERO pyramid tiles of {tile_width}x{tile_height} exceed the "
                    f"{self.max_call_bytes}-byte call limit"
                )
            self.tile_width, height = tile_width, tile_height
        else:
            # Any full-width stripe is accepted; keep each call under the limit.
            height = max(1, min(tile_height, self.max_call_bytes // row_bytes))
        self.bands = [
            (y, min(y + height, self.source.height)) for y in range(0, self.source.height, height)
        ]
        self.pieces = [self.source.band(y0, y1) for y0, y1 in self.bands]
        self.needs = [sorted({p.index for p in pieces}) for pieces in self.pieces]

    def _ready(self, plane: int, band: int) -> bool:
        z, c, t = self.planes[plane]
        keys = (TileKey(i, z, c, t) for i in self.needs[band])
        return all(key in self.tiles or not self.held(key) for key in keys)

    def _compose(
        self, plane: int, band: int, tile_of: Callable[[TileKey], np.ndarray[Any, Any] | None]
    ) -> np.ndarray[Any, Any]:
        z, c, t = self.planes[plane]
        y0, y1 = self.bands[band]
        pixels = np.zeros((y1 - y0, self.source.width), self.dtype)
        for piece in self.pieces[band]:
            r = piece.canvas
            tile = tile_of(TileKey(piece.index, z, c, t))
            if tile is None:  # a tile the image does not hold: its area stays 0
                continue
            pixels[r.y0 - y0 : r.y1 - y0, r.x0 : r.x1] = tile[piece.tile.slices]
        return pixels

    def digest(self, load: Callable[[TileKey], np.ndarray[Any, Any] | None]) -> str:
        """SHA-1 (hex) of the pixels meant for OMERO, as `calculateMessageDigest` makes it."""
        if self.pyramid:
            return self._sha1.hexdigest()
        sha1 = hashlib.sha1()
        wire = self.dtype.newbyteorder(">")
        for plane in range(len(self.planes)):
            for band in range(len(self.bands)):
                pixels = self._compose(plane, band, load)
                sha1.update(np.ascontiguousarray(pixels, dtype=wire).tobytes())
        return sha1.hexdigest()

    def _write(self, plane: int, band: int) -> None:
        z, c, t = self.planes[plane]
        y0, y1 = self.bands[band]
        width = self.source.width
        pixels = self._compose(plane, band, self.tiles.get)
        self._track(c, pixels)
        wire = self.dtype.newbyteorder(">")
        if self.pyramid:
            self._sha1.update(np.ascontiguousarray(pixels, dtype=wire).tobytes())
        for x in range(0, width, self.tile_width):
            w = min(self.tile_width, width - x)
            buf = np.ascontiguousarray(pixels[:, x : x + w], dtype=wire).tobytes()
            self.rps.setTile(buf, z, c, t, x, y0, w, y1 - y0)
        self.written[plane].add(band)
        if len(self.written[plane]) == len(self.bands):
            # The plane is in OMERO: its tiles are no longer needed here.
            for i in self.indices:
                self.tiles.pop(TileKey(i, z, c, t), None)

    def _track(self, c: int, pixels: np.ndarray[Any, Any]) -> None:
        values = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if c in self.ranges:
            old_low, old_high = self.ranges[c]
            low, high = min(low, old_low), max(high, old_high)
        self.ranges[c] = (low, high)


def read_digest(session: OmeroSession, pixels_id: int, wait_s: float) -> str:
    """OMERO's SHA-1 (hex) of what Pixels:`pixels_id` holds, from a fresh RawPixelsStore. A
    pyramid still being built answers MissingPyramidException: wait for it, up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        rps = session.raw_pixels_store()
        try:
            rps.setPixelsId(pixels_id, True)
            digest = rps.calculateMessageDigest()
            if not digest:
                raise PermanentError(f"OMERO computes no digest for Pixels:{pixels_id}")
            return bytes(digest).hex()
        except omero.MissingPyramidException:
            if time.monotonic() > deadline:
                raise TransientError(
                    f"OMERO did not finish the pyramid of Pixels:{pixels_id} in {wait_s:.0f} s"
                ) from None
        finally:
            try:
                rps.close()
            except Exception as exc:  # a store that cannot close is gone anyway
                log.debug("closing a RawPixelsStore failed: %s", type(exc).__name__)
        time.sleep(1.0)

"""The pixel-writing rules of OMERO.server 5.6 (see shared/omero-facts.md), as pure logic.

Kept free of Ice servants so each rule can be read (and changed) in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import omero

# sizeX * sizeY above this needs a pyramid (omero.pixeldata.max_plane_width/height = 3192).
DEFAULT_PYRAMID_THRESHOLD_PX = 3192 * 3192
DEFAULT_PYRAMID_TILE = (256, 256)
# ROMIO's tile budget: getTileSize() = (sizeX, min(sizeY, 1 MiB / bytesPerPixel / sizeX)).
ROMIO_TILE_BYTES = 1048576
NON_TILE_WRITE = "Non-tile based writing unsupported."

PIXEL_TYPES: dict[str, str] = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float": "f4",
    "double": "f8",
}


def unsupported(message: str) -> omero.InternalException:
    # The Java pixel buffers throw UnsupportedOperationException, which blitz hands to
    # clients as an InternalException naming that class.
    return omero.InternalException(
        serverExceptionClass="java.lang.UnsupportedOperationException", message=message
    )


def misuse(message: str) -> omero.ApiUsageException:
    return omero.ApiUsageException(message=message)


@dataclass(frozen=True)
class Geometry:
    size_x: int
    size_y: int
    size_z: int
    size_c: int
    size_t: int
    pixel_type: str

    def __post_init__(self) -> None:
        if self.pixel_type not in PIXEL_TYPES:
            raise misuse(f"pixel type {self.pixel_type!r} is not supported by the stand-in")
        if min(self.size_x, self.size_y, self.size_z, self.size_c, self.size_t) < 1:
            raise misuse(f"all sizes must be >= 1: {self}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(PIXEL_TYPES[self.pixel_type])

    @property
    def wire_dtype(self) -> np.dtype:
        # Pixel buffers travel big-endian in both directions.
        return self.dtype.newbyteorder(">")

    @property
    def bytes_per_pixel(self) -> int:
        return self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.size_t, self.size_c, self.size_z, self.size_y, self.size_x)

    @property
    def plane_bytes(self) -> int:
        return self.size_x * self.size_y * self.bytes_per_pixel


@dataclass(frozen=True)
class Tile:
    z: int
    c: int
    t: int
    x: int
    y: int
    w: int
    h: int


class WriteRules:
    """Which writing mode an image gets and what its tiles must look like."""

    def __init__(
        self,
        pyramid_threshold_px: int = DEFAULT_PYRAMID_THRESHOLD_PX,
        pyramid_tile: tuple[int, int] = DEFAULT_PYRAMID_TILE,
    ) -> None:
        self.pyramid_threshold_px = pyramid_threshold_px
        self.pyramid_tile = pyramid_tile

    def requires_pyramid(self, g: Geometry) -> bool:
        return g.size_x * g.size_y > self.pyramid_threshold_px

    def tile_size(self, g: Geometry) -> tuple[int, int]:
        if self.requires_pyramid(g):
            return self.pyramid_tile
        rows = ROMIO_TILE_BYTES // g.bytes_per_pixel // g.size_x
        # Very wide ROMIO images would get 0 rows from the formula; one row is the least
        # a client can write.
        return (g.size_x, max(1, min(g.size_y, rows)))

    def pyramid_tiles(self, g: Geometry) -> Iterator[Tile]:
        """The one order a pyramid accepts: planes in XYZCT order, tiles in raster order."""
        tw, th = self.pyramid_tile
        for t in range(g.size_t):
            for c in range(g.size_c):
                for z in range(g.size_z):
                    for y in range(0, g.size_y, th):
                        for x in range(0, g.size_x, tw):
                            yield Tile(z, c, t, x, y, min(tw, g.size_x - x), min(th, g.size_y - y))

    def pyramid_tile_count(self, g: Geometry) -> int:
        tw, th = self.pyramid_tile
        per_plane = math.ceil(g.size_x / tw) * math.ceil(g.size_y / th)
        return per_plane * g.size_z * g.size_c * g.size_t

    def check_romio_tile(self, g: Geometry, tile: Tile) -> None:
        if tile.x != 0 or tile.w != g.size_x:
            raise unsupported(
                f"ROMIO setTile takes full-width stripes only (x=0, w={g.size_x}); "
                f"got x={tile.x}, w={tile.w}"
            )


def check_bounds(g: Geometry, tile: Tile) -> None:
    if not (0 <= tile.z < g.size_z and 0 <= tile.c < g.size_c and 0 <= tile.t < g.size_t):
        raise misuse(f"plane z={tile.z} c={tile.c} t={tile.t} outside {g}")
    if tile.w < 1 or tile.h < 1 or tile.x < 0 or tile.y < 0:
        raise misuse(f"empty or negative region {tile}")
    if tile.x + tile.w > g.size_x or tile.y + tile.h > g.size_y:
        raise misuse(f"region {tile} outside the {g.size_x}x{g.size_y} plane")


def decode(g: Geometry, buf: bytes, count: int, what: str) -> np.ndarray:
    """Big-endian wire bytes to native values, refusing a buffer of the wrong length."""
    expected = count * g.bytes_per_pixel
    if len(buf) != expected:
        raise misuse(f"{what}: buffer has {len(buf)} bytes, expected {expected}")
    return np.frombuffer(buf, dtype=g.wire_dtype).astype(g.dtype)


def encode(g: Geometry, values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=g.wire_dtype).tobytes()

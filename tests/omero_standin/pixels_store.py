"""omero.api.RawPixelsStore with the write rules of a real server (see rules.py).

One store is one stateful server session over one Pixels object. Writing ends for good at the
first read, save() or close(); a pyramid also forgets nothing: a pass that ended early leaves
the image BROKEN and every later write is refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import omero
import omero.api
from omero.rtypes import rstring

from .amd import servant
from .pixel_buffers import MISSING_PYRAMID, PixelBuffer
from .rules import NON_TILE_WRITE, Tile, check_bounds, decode, encode, misuse, unsupported
from .services.base import Service
from .services.pixels import PIX_DESCRIPTION


def digest(pixels: PixelBuffer) -> bytes:
    """SHA-1 of the pixels as OMERO.server 5.6 computes it (RawPixelsStore.
    calculateMessageDigest), read in ome/omero-romio: `RomioPixelBuffer` digests
    getPlane(z, c, t) for t, c, z (z fastest) of its big-endian file; a pyramid's
    `BfPyramidPixelBuffer` delegates to `BfPixelsWrapper.getMessageDigest`, which digests the
    pyramid TIFF timepoint by timepoint, one plane each in the same XYZCT order
    (`getRasterizedT`), written big-endian. Both: the planes in XYZCT order, rows top to
    bottom, big-endian samples, which is `data` (T, C, Z, Y, X) in C order, encoded."""
    return hashlib.sha1(encode(pixels.geometry, pixels.data)).digest()


@servant
class RawPixelsStore(omero.api.RawPixelsStore, Service):
    def __init__(self, server: Any, session: Any, name: str) -> None:
        Service.__init__(self, server, session)
        self.name = name
        self.buffer: PixelBuffer | None = None
        self.writing_ended = False
        self.closed = False

    # -- life cycle ----------------------------------------------------------------------
    def is_alive(self) -> bool:
        return not self.closed and not self.session.omero.closed

    def setPixelsId(self, pixelsId: int, bypassOriginalFile: bool, current: Any = None) -> None:
        buf = self.server.repository.get(pixelsId)
        if buf is None:
            raise omero.ValidationException(message=f"Pixels:{pixelsId} does not exist")
        self._end_writing()
        self.buffer, self.writing_ended = buf, False

    def getPixelsId(self, current: Any = None) -> int:
        return self._buf().pixels_id

    def getPixelsPath(self, current: Any = None) -> str:
        return f"/OMERO/Pixels/{self._buf().pixels_id}"

    def prepare(self, pixelsIds: Any, current: Any = None) -> None:
        pass

    def save(self, current: Any = None) -> Any:
        self._end_writing()
        buf = self._buf()
        pixels = self.server.store.get("Pixels", buf.pixels_id)
        if pixels is not None and buf.readable():
            # RawPixelsBean.save (ome/omero-server) stores the buffer's digest as Pixels.sha1.
            pixels.setSha1(rstring(digest(buf).hex()))
        return self.server.store.copy_out(pixels, PIX_DESCRIPTION) if pixels else None

    def close(self, current: Any = None) -> None:
        self.end()
        self.session.servants.pop(self.name, None)

    def end(self) -> None:
        """The store goes away (close, session death, server stop)."""
        self._end_writing()
        self.closed = True

    def activate(self, current: Any = None) -> None:
        pass

    def passivate(self, current: Any = None) -> None:
        pass

    def getCurrentEventContext(self, current: Any = None) -> Any:
        return self.event_context()

    # -- description ---------------------------------------------------------------------
    def requiresPixelsPyramid(self, current: Any = None) -> bool:
        return self._buf().pyramid

    def getTileSize(self, current: Any = None) -> list[int]:
        buf = self._buf()
        return list(buf.rules.tile_size(buf.geometry))

    def getResolutionLevels(self, current: Any = None) -> int:
        return 1  # the stand-in keeps full resolution only

    def getResolutionLevel(self, current: Any = None) -> int:
        return 0

    def setResolutionLevel(self, resolutionLevel: int, current: Any = None) -> None:
        if resolutionLevel != 0:
            raise misuse("the stand-in keeps full resolution only (level 0)")

    def getResolutionDescriptions(self, current: Any = None) -> list[Any]:
        g = self._buf().geometry
        return [omero.api.ResolutionDescription(g.size_x, g.size_y)]

    def getByteWidth(self, current: Any = None) -> int:
        return self._buf().geometry.bytes_per_pixel

    def isSigned(self, current: Any = None) -> bool:
        return self._buf().geometry.dtype.kind in "if"

    def isFloat(self, current: Any = None) -> bool:
        return self._buf().geometry.dtype.kind == "f"

    def getPlaneSize(self, current: Any = None) -> int:
        return self._buf().geometry.plane_bytes

    def getRowSize(self, current: Any = None) -> int:
        g = self._buf().geometry
        return g.size_x * g.bytes_per_pixel

    def getStackSize(self, current: Any = None) -> int:
        g = self._buf().geometry
        return g.plane_bytes * g.size_z

    def getTimepointSize(self, current: Any = None) -> int:
        g = self._buf().geometry
        return g.plane_bytes * g.size_z * g.size_c

    def getTotalSize(self, current: Any = None) -> int:
        g = self._buf().geometry
        return g.plane_bytes * g.size_z * g.size_c * g.size_t

    def getRowOffset(self, y: int, z: int, c: int, t: int, current: Any = None) -> int:
        g = self._buf().geometry
        return self.getPlaneOffset(z, c, t) + y * g.size_x * g.bytes_per_pixel

    def getPlaneOffset(self, z: int, c: int, t: int, current: Any = None) -> int:
        g = self._buf().geometry
        return ((t * g.size_c + c) * g.size_z + z) * g.plane_bytes

    def getStackOffset(self, c: int, t: int, current: Any = None) -> int:
        return self.getPlaneOffset(0, c, t)

    def getTimepointOffset(self, t: int, current: Any = None) -> int:
        return self.getPlaneOffset(0, 0, t)

    # -- writing -------------------------------------------------------------------------
    def setTile(
        self, buf: bytes, z: int, c: int, t: int, x: int, y: int, w: int, h: int,
        current: Any = None,
    ) -> None:  # fmt: skip
        pixels = self._writable()
        tile = Tile(z, c, t, x, y, w, h)
        check_bounds(pixels.geometry, tile)
        values = decode(pixels.geometry, buf, w * h, "setTile")
        if pixels.pyramid:
            pixels.accept_pyramid_tile(self, tile, values)
        else:
            pixels.rules.check_romio_tile(pixels.geometry, tile)
            pixels.write_region(tile, values)
        self._maybe_corrupt(pixels, tile)
        self.server.count_set_tile()

    def setRow(self, buf: bytes, y: int, z: int, c: int, t: int, current: Any = None) -> None:
        pixels = self._writable_romio()
        tile = Tile(z, c, t, 0, y, pixels.geometry.size_x, 1)
        check_bounds(pixels.geometry, tile)
        pixels.write_region(tile, decode(pixels.geometry, buf, tile.w, "setRow"))

    def setPlane(self, buf: bytes, z: int, c: int, t: int, current: Any = None) -> None:
        pixels = self._writable_romio()
        g = pixels.geometry
        tile = Tile(z, c, t, 0, 0, g.size_x, g.size_y)
        check_bounds(g, tile)
        pixels.write_region(tile, decode(g, buf, g.size_x * g.size_y, "setPlane"))

    def setRegion(self, size: int, offset: int, buf: bytes, current: Any = None) -> None:
        pixels = self._writable_romio()
        g = pixels.geometry
        flat = pixels.data.reshape(-1)
        start, count = self._span(offset, size)
        flat[start : start + count] = decode(g, buf[:size], count, "setRegion")

    def setStack(self, buf: bytes, z: int, c: int, t: int, current: Any = None) -> None:
        pixels = self._writable_romio()
        g = pixels.geometry
        self._check_plane(0, c, t)
        values = decode(g, buf, g.size_z * g.size_y * g.size_x, "setStack")
        pixels.data[t, c] = values.reshape(g.size_z, g.size_y, g.size_x)

    def setTimepoint(self, buf: bytes, t: int, current: Any = None) -> None:
        pixels = self._writable_romio()
        g = pixels.geometry
        self._check_plane(0, 0, t)
        values = decode(g, buf, g.size_c * g.size_z * g.size_y * g.size_x, "setTimepoint")
        pixels.data[t] = values.reshape(g.size_c, g.size_z, g.size_y, g.size_x)

    # -- reading (each read ends writing for good) ---------------------------------------
    def getTile(
        self, z: int, c: int, t: int, x: int, y: int, w: int, h: int, current: Any = None
    ) -> bytes:
        pixels = self._readable()
        tile = Tile(z, c, t, x, y, w, h)
        check_bounds(pixels.geometry, tile)
        return encode(pixels.geometry, pixels.data[t, c, z, y : y + h, x : x + w])

    def getPlane(self, z: int, c: int, t: int, current: Any = None) -> bytes:
        pixels = self._readable()
        self._check_plane(z, c, t)
        return encode(pixels.geometry, pixels.data[t, c, z])

    def getRow(self, y: int, z: int, c: int, t: int, current: Any = None) -> bytes:
        pixels = self._readable()
        check_bounds(pixels.geometry, Tile(z, c, t, 0, y, pixels.geometry.size_x, 1))
        return encode(pixels.geometry, pixels.data[t, c, z, y])

    def getCol(self, x: int, z: int, c: int, t: int, current: Any = None) -> bytes:
        pixels = self._readable()
        check_bounds(pixels.geometry, Tile(z, c, t, x, 0, 1, pixels.geometry.size_y))
        return encode(pixels.geometry, pixels.data[t, c, z, :, x])

    def getRegion(self, size: int, offset: int, current: Any = None) -> bytes:
        pixels = self._readable()
        start, count = self._span(offset, size)
        return encode(pixels.geometry, pixels.data.reshape(-1)[start : start + count])

    def getStack(self, c: int, t: int, current: Any = None) -> bytes:
        pixels = self._readable()
        self._check_plane(0, c, t)
        return encode(pixels.geometry, pixels.data[t, c])

    def getTimepoint(self, t: int, current: Any = None) -> bytes:
        pixels = self._readable()
        self._check_plane(0, 0, t)
        return encode(pixels.geometry, pixels.data[t])

    def calculateMessageDigest(self, current: Any = None) -> bytes:
        return digest(self._readable())

    def _maybe_corrupt(self, pixels: PixelBuffer, tile: Tile) -> None:
        faults = self.server.faults
        if faults.flip_byte == 0 or pixels.corrupted:
            return
        if faults.flip_byte > 0:
            faults.flip_byte -= 1
        pixels.corrupted = True
        region = pixels.data[
            tile.t, tile.c, tile.z, tile.y : tile.y + tile.h, tile.x : tile.x + tile.w
        ]
        region.view(np.uint8)[0, 0] ^= 0x01  # a view: reshape(-1) could copy

    # -- guards --------------------------------------------------------------------------
    def _buf(self) -> PixelBuffer:
        if self.closed:
            raise misuse("this RawPixelsStore is closed")
        if self.buffer is None:
            raise misuse("call setPixelsId first")
        if self.server.repository.get(self.buffer.pixels_id) is not self.buffer:
            raise omero.ValidationException(message=f"Pixels:{self.buffer.pixels_id} was deleted")
        return self.buffer

    def _writable(self) -> PixelBuffer:
        pixels = self._buf()
        if self.writing_ended:
            raise misuse(
                "this RawPixelsStore is read-only: writing ended at the first read, save() or "
                "close(); use a new store (pyramids cannot be written again at all)"
            )
        self.check_write("Pixels", False)
        return pixels

    def _writable_romio(self) -> PixelBuffer:
        pixels = self._writable()
        if pixels.pyramid:
            raise unsupported(NON_TILE_WRITE)
        return pixels

    def _readable(self) -> PixelBuffer:
        self._end_writing()
        pixels = self._buf()
        if not pixels.readable():
            raise omero.MissingPyramidException(pixelsID=pixels.pixels_id, message=MISSING_PYRAMID)
        return pixels

    def _end_writing(self) -> None:
        if self.buffer is not None:
            self.buffer.end_pass(self)
        self.writing_ended = True

    def _check_plane(self, z: int, c: int, t: int) -> None:
        g = self._buf().geometry
        check_bounds(g, Tile(z, c, t, 0, 0, g.size_x, g.size_y))

    def _span(self, offset: int, size: int) -> tuple[int, int]:
        g = self._buf().geometry
        bpp = g.bytes_per_pixel
        total = int(np.prod(g.shape)) * bpp
        if offset % bpp or size % bpp or offset < 0 or size < 0 or offset + size > total:
            raise misuse(f"region offset={offset} size={size} outside the {total}-byte buffer")
        return offset // bpp, size // bpp

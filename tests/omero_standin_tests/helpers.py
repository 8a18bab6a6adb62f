"""Small writers used by the stand-in's tests: the calls an ingest makes, nothing more."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import omero
from omero.rtypes import rstring

PIXEL_TYPES = {
    np.dtype("uint8"): "uint8",
    np.dtype("uint16"): "uint16",
    np.dtype("float64"): "double",
}


def digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def big_endian(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder(">")).tobytes()


def create_image(
    conn: Any, shape: tuple[int, int, int, int, int], dtype: Any, name: str = "img"
) -> tuple[int, int]:
    """Create an image for a (T, C, Z, Y, X) array; return (image id, pixels id)."""
    t, c, z, y, x = shape
    sf = conn.c.sf
    ptype = sf.getQueryService().findByString("PixelsType", "value", PIXEL_TYPES[np.dtype(dtype)])
    image_id = sf.getPixelsService().createImage(x, y, z, t, list(range(c)), ptype, name, "").val
    image = sf.getQueryService().findByQuery(
        "select i from Image i join fetch i.pixels p where i.id = :id",
        omero.sys.ParametersI().addId(image_id),
    )
    return image_id, image.getPrimaryPixels().id.val


def open_store(conn: Any, pixels_id: int) -> Any:
    rps = conn.c.sf.createRawPixelsStore()
    rps.setPixelsId(pixels_id, True)
    return rps


def write_stripes(rps: Any, arr: np.ndarray) -> None:
    """ROMIO: full-width stripes of getTileSize() rows, in reverse order (any order is fine)."""
    t_n, c_n, z_n, size_y, size_x = arr.shape
    _, rows = rps.getTileSize()
    for t in range(t_n):
        for c in range(c_n):
            for z in range(z_n):
                for y in reversed(range(0, size_y, rows)):
                    h = min(rows, size_y - y)
                    rps.setTile(big_endian(arr[t, c, z, y : y + h]), z, c, t, 0, y, size_x, h)


def pyramid_order(
    arr: np.ndarray, tile: tuple[int, int]
) -> list[tuple[int, int, int, int, int, int, int]]:
    """(z, c, t, x, y, w, h) in the one order a pyramid accepts."""
    t_n, c_n, z_n, size_y, size_x = arr.shape
    tw, th = tile
    return [
        (z, c, t, x, y, min(tw, size_x - x), min(th, size_y - y))
        for t in range(t_n)
        for c in range(c_n)
        for z in range(z_n)
        for y in range(0, size_y, th)
        for x in range(0, size_x, tw)
    ]


def write_tiles(
    rps: Any, arr: np.ndarray, order: list[tuple[int, int, int, int, int, int, int]]
) -> None:
    for z, c, t, x, y, w, h in order:
        rps.setTile(big_endian(arr[t, c, z, y : y + h, x : x + w]), z, c, t, x, y, w, h)


def read_tiles(rps: Any, shape: tuple[int, int, int, int, int], dtype: Any) -> np.ndarray:
    """Read a whole image back tile by tile through the client."""
    out = np.zeros(shape, dtype=dtype)
    wire = np.dtype(dtype).newbyteorder(">")
    tw, th = rps.getTileSize()
    for z, c, t, x, y, w, h in pyramid_order(out, (tw, th)):
        out[t, c, z, y : y + h, x : x + w] = np.frombuffer(
            rps.getTile(z, c, t, x, y, w, h), wire
        ).reshape(h, w)
    return out


def new_project(conn: Any, name: str) -> Any:
    project = omero.model.ProjectI()
    project.setName(rstring(name))
    return conn.c.sf.getUpdateService().saveAndReturnObject(project)

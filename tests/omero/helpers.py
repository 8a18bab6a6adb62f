"""Settings, reading back and bookkeeping for the OMERO backend tests.

Tests take `omero_target` (a real server when TILEBRIDGE_OMERO_HOST is set, else a stand-in)
and read back through the plain omero-py client, so they mean the same on both. Checks that
need the stand-in's hooks or accessors call `standin(target)`, which skips on a real server.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import Layout, OpenManifest
from tilebridge_storage.mosaic import assemble
from tilebridge_storage.omero_backend.settings import DevicePolicy, OmeroSettings
from tilebridge_storage.testing.manifests import make_manifest

Tiles = dict[TileKey, np.ndarray[Any, Any]]
DEVICE = "scope-1"
OPEN_POLICY = DevicePolicy(may_create=True, may_create_project=True)


def settings_for(target: Any, **overrides: Any) -> OmeroSettings:
    values: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "username": target.username,
        "password": SecretStr(target.password),
        "group": target.group or None,
        "default_policy": OPEN_POLICY,
        "connect_timeout_s": 5.0,
        "call_timeout_s": 30.0,
    }
    values.update(overrides)
    return OmeroSettings(**values)


def standin(target: Any) -> Any:
    """The stand-in behind `target`; skips the test on a real server."""
    if target.server is None:
        pytest.skip("needs the OMERO stand-in's fault hooks / accessors")
    return target.server


def unique_manifest(**overrides: Any) -> OpenManifest:
    """A manifest in a project/dataset of its own run, so a real server's data never mixes."""
    overrides.setdefault("project", "tilebridge-tests")
    return make_manifest(**overrides)


def digest(arr: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(
        np.ascontiguousarray(arr, arr.dtype.newbyteorder("=")).tobytes()
    ).hexdigest()


def expected_pixels(manifest: OpenManifest, tiles: Tiles, index: int | None = None) -> Any:
    """(T, C, Z, Y, X): the mosaic canvas, or (per_tile) the planes of position `index`."""
    m = manifest
    planes = []
    for t in range(m.size_t):
        for c in range(m.size_c):
            for z in range(m.size_z):
                if index is None:
                    plane = {k.index: v for k, v in tiles.items() if (k.z, k.c, k.t) == (z, c, t)}
                    planes.append(assemble(m, plane))
                else:  # a tile the image does not hold is zeros
                    tile = tiles.get(TileKey(index, z, c, t))
                    planes.append(
                        tile if tile is not None else np.zeros((m.tile_height, m.tile_width))
                    )
    stacked = np.stack(planes).astype(m.dtype.numpy.newbyteorder("="))
    return stacked.reshape(m.size_t, m.size_c, m.size_z, *stacked.shape[1:])


def read_pixels(conn: Any, image_id: int, attempts: int = 60) -> Any:
    """An image's pixels (T, C, Z, Y, X) read through RawPixelsStore.getTile, tile by tile.

    A real server builds pyramids after the write; reads wait for it (MissingPyramid)."""
    import omero

    sf = conn.c.sf
    params = omero.sys.ParametersI().addId(image_id)
    pixels = sf.getQueryService().findByQuery(
        "select p from Pixels p join fetch p.pixelsType where p.image.id = :id", params
    )
    sizes = [getattr(pixels, f"getSize{axis}")().getValue() for axis in "TCZYX"]
    dtype = {"float": "f4", "double": "f8"}.get(pixels.getPixelsType().getValue().getValue())
    dtype = np.dtype(dtype or pixels.getPixelsType().getValue().getValue())
    for _ in range(attempts):
        rps = sf.createRawPixelsStore()
        try:
            rps.setPixelsId(pixels.getId().getValue(), True)
            return _read_tiles(rps, sizes, dtype)
        except omero.MissingPyramidException:
            time.sleep(1)
        finally:
            rps.close()
    raise AssertionError(f"the pyramid of Image:{image_id} was never built")


def _read_tiles(rps: Any, sizes: list[int], dtype: np.dtype[Any]) -> Any:
    size_t, size_c, size_z, size_y, size_x = sizes
    out = np.zeros(sizes, dtype)
    tw, th = rps.getTileSize()
    wire = dtype.newbyteorder(">")
    for t in range(size_t):
        for c in range(size_c):
            for z in range(size_z):
                for y in range(0, size_y, th):
                    for x in range(0, size_x, tw):
                        w, h = min(tw, size_x - x), min(th, size_y - y)
                        buf = rps.getTile(z, c, t, x, y, w, h)
                        out[t, c, z, y : y + h, x : x + w] = np.frombuffer(buf, wire).reshape(h, w)
    return out


def key_values(conn: Any, image_id: int, namespace: str) -> dict[str, str]:
    import omero

    params = omero.sys.ParametersI().addId(image_id)
    image = conn.c.sf.getQueryService().findByQuery(
        "select i from Image i left outer join fetch i.annotationLinks al "
        "left outer join fetch al.child where i.id = :id",
        params,
    )
    pairs: dict[str, str] = {}
    for link in image.copyAnnotationLinks():
        ann = link.getChild()
        if isinstance(ann, omero.model.MapAnnotation) and ann.getNs().getValue() == namespace:
            pairs.update((nv.name, nv.value) for nv in ann.getMapValue())
    return pairs


def images_of(conn: Any, manifest: OpenManifest) -> list[int]:
    """Every OMERO image carrying this tilebridge image's provenance."""
    import omero

    from tilebridge_storage.omero_backend.provenance import PROVENANCE_NS

    params = omero.sys.ParametersI()
    params.add("ns", omero.rtypes.rstring(PROVENANCE_NS))
    params.add("uuid", omero.rtypes.rstring(str(manifest.image_id)))
    rows = conn.c.sf.getQueryService().projection(
        "select distinct l.parent.id from ImageAnnotationLink l join l.child a "
        "where a.ns = :ns and a.description = :uuid",
        params,
    )
    return sorted(r[0].getValue() for r in rows)


def per_tile(manifest: OpenManifest) -> bool:
    return manifest.layout is Layout.PER_TILE

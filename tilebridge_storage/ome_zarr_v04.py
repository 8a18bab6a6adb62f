"""OME-Zarr NGFF 0.4 (zarr v2) mosaic, written in place so it can be viewed while it grows.

This is the store ImSwitch's live view reads (viv's zarr loader over HTTP: `.zattrs`,
`.zarray`, NGFF 0.4): at `root/<image_name>.ome.zarr` (`paths.named_path`; ImSwitch's
`<base_dir>.ome.zarr`), array `0` of axes (t, c, z, y, x), chunks (1, 1, 1, chunk, chunk)
with "/" as the chunk key separator, Blosc zstd as ImSwitch writes. Placement and metadata
are those of the NGFF 0.5 backend (`ome_zarr`: canvas by stage position, the `mosaic` rules;
scale, time axis, channels, the `tilebridge` block).

Unlike that backend it is not built aside and renamed: the group and level 0 exist, with
their NGFF metadata, from the first tile on, and each tile is painted into them as it
arrives, so a viewer shows the scan as it is acquired (`chunks_of` says which chunks a tile
changed). Until `finish()` the metadata lists level 0 only and `tilebridge.complete` is false;
`finish()` builds the pyramid (2x2 means), lists every level, validates the metadata
(ome-zarr-models), fsyncs the store and sets `complete`. A failed `finish()` can be called
again. An image that holds fewer tiles (`expect`) keeps zeros where a missing tile would
show, `complete` means written to the end, and its key-values say what it holds
(`tilebridge.incomplete`, `tilebridge.not_planned`). The store is claimed for its image
(`paths.claim`): a new attempt of the same image starts it afresh, `abort()` removes it,
another image's store is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from ome_zarr_models.v04.image import Image
from zarr.storage import LocalStore

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.durable import disk_errors, fsync_dir, fsync_file, remove
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.mosaic import (
    CHUNK,
    chunks_of,
    downsample_level,
    plan,
    pyramid_shapes,
    require_mosaic,
)
from tilebridge_storage.ome_zarr import multiscale, omero_block, tilebridge_block
from tilebridge_storage.paths import check_writable, claim, named_path, release

__all__ = ["CHUNK", "OmeZarrV04Backend", "chunks_of"]

SUFFIX = ".ome.zarr"


class OmeZarrV04Backend(StorageBackend):
    """docstring inherited"""

    kind = "ome_zarr_v04"

    def __init__(self, root: Path, chunk: int = CHUNK, name: str | None = None) -> None:
        super().__init__(name)
        self.root = Path(root)
        self.chunk = chunk

    def check(self) -> None:
        check_writable(self.root)

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        require_mosaic(manifest, self.name)
        path = named_path(self.root, manifest, f"{{name}}{SUFFIX}")
        claim(path, manifest.image_id)
        return _LiveZarrWriter(device, manifest, self.name, path, self.chunk)


class _LiveZarrWriter(ImageWriter):
    def __init__(
        self, device: str, manifest: OpenManifest, backend: str, path: Path, chunk: int
    ) -> None:
        super().__init__(device, manifest, backend)
        self.path = path
        self.chunk = chunk
        self.mosaic = plan(manifest)
        self.written: set[TileKey] = set()
        self.group: zarr.Group | None = None
        self.level0: zarr.Array[Any] | None = None
        self.stored: StoredImage | None = None

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        if not self.admit(key, pixels, self.written, self.stored is not None):
            return
        data = np.asarray(pixels, dtype=self.manifest.dtype.numpy)
        with disk_errors(f"writing {self.path}"):
            level0 = self.level0 if self.level0 is not None else self._start()
            for piece in self.mosaic.pieces_of(key.index):
                level0[(key.t, key.c, key.z, *piece.canvas.slices)] = data[piece.tile.slices]
        self.written.add(key)

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self.require_complete(self.written)
        with disk_errors(f"writing {self.path}"):
            if self.level0 is None:  # an image that holds no tile (see `expect`): all zeros
                self._start()
            assert self.group is not None and self.level0 is not None
            group = self.group
            levels = [self.level0]
            shapes = pyramid_shapes(self.mosaic.height, self.mosaic.width, self.chunk)
            for level, (height, width) in enumerate(shapes[1:], 1):
                levels.append(self._array(level, height, width))
                downsample_level(levels[-2], levels[-1], self.chunk)
            group.attrs.update(self._attributes(levels, complete=True))
            try:
                Image.from_zarr(zarr.open_group(self.path, mode="r", zarr_format=2))
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise PermanentError(f"invalid OME-Zarr metadata for {self.path}: {exc}") from exc
            for folder, _, files in os.walk(self.path, topdown=False):
                for name in files:
                    fsync_file(Path(folder, name))
                fsync_dir(Path(folder))
            fsync_dir(self.path.parent)
        self.group = self.level0 = None
        self.stored = StoredImage(self.backend_name, str(self.path))
        return self.stored

    def abort(self) -> None:
        if self.stored is None:
            self.group = self.level0 = None
            self.written.clear()
            remove(self.path)
            release(self.path)

    def _start(self) -> zarr.Array[Any]:
        """A fresh store (an earlier attempt's is replaced) with level 0 and its metadata."""
        remove(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(store=LocalStore(self.path), mode="w", zarr_format=2)
        self.level0 = self._array(0, self.mosaic.height, self.mosaic.width)
        self.group.attrs.update(self._attributes([self.level0], complete=False))
        return self.level0

    def _array(self, level: int, height: int, width: int) -> zarr.Array[Any]:
        m = self.manifest
        assert self.group is not None
        return self.group.create_array(
            name=str(level),
            shape=(m.size_t, m.size_c, m.size_z, height, width),
            chunks=(1, 1, 1, self.chunk, self.chunk),
            dtype=m.dtype.numpy,
            fill_value=0,
            compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE),
            chunk_key_encoding={"name": "v2", "separator": "/"},
            overwrite=True,
        )

    def _attributes(self, levels: list[zarr.Array[Any]], complete: bool) -> dict[str, Any]:
        m = self.manifest
        if complete:
            overview = np.asarray(levels[-1][:])
        else:
            # While acquiring, the display window cannot come from pixels not yet taken: the
            # pixel type's whole range, as ImSwitch shows it.
            dtype = m.dtype.numpy
            info = np.iinfo(dtype) if dtype.kind in "ui" else None
            low, high = (info.min, info.max) if info else (0.0, 1.0)
            overview = np.tile(np.array([low, high], dtype), (1, m.size_c, 1))
        return {
            "multiscales": [{"version": "0.4", **multiscale(m, self.mosaic, len(levels))}],
            "omero": omero_block(m, overview),
            "tilebridge": {
                **tilebridge_block(m, self.device, self.planes, self.image_key_values()),
                "complete": complete,
            },
        }

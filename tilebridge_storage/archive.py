"""The local archive: the embedded default storage of the ingest.

One OME-TIFF (BigTIFF) per image under a data directory, readable by tifffile, Fiji /
Bio-Formats and QuPath: every stage position is one OME series of shape (T, C, Z, Y, X), so
tiles are kept exactly as acquired (nothing stitched, nothing lost) whatever the layout. Each
plane says where the stage was measured (the planned position where nothing was measured),
its exposure and DeltaT; each series carries the channel names and colours, the time
increment and the image's key-values (with its planned position) as a MapAnnotation. The
file is written at `finish()` from the tiles handed in (on the server these are memory maps
of staged tiles, so nothing is held in memory).

Verified (unless `verify=False`): while writing, the SHA-1 of every plane as written (file
order: position by position, T, C, Z, little-endian samples) is computed; after the file is
durable it is read back page by page and digested the same way. A mismatch removes the file
and raises `DigestMismatchError`; a match is the image's `digest` (`sha1:<hex>`).

An image that holds fewer tiles (`expect`) has no series for a position without any tile
(each series names its position); a position missing some planes keeps them as zeros and
says which in `tilebridge.missing_planes`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.durable import atomic_write, disk_errors, remove
from tilebridge_storage.base import DigestMismatchError, ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.paths import check_writable, image_path
from tilebridge_storage.plane_metadata import missing_planes, position_planes
from tilebridge_storage.tiff_metadata import ome_metadata

SUFFIX = ".ome.tif"


class ArchiveBackend(StorageBackend):
    """docstring inherited"""

    kind = "archive"

    def __init__(self, root: Path, name: str | None = None, verify: bool = True) -> None:
        super().__init__(name)
        self.root = Path(root)
        self.verify = verify

    def check(self) -> None:
        check_writable(self.root)

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        path = image_path(self.root, device, manifest, SUFFIX)
        return _ArchiveWriter(device, manifest, self.name, path, self.verify)


class _ArchiveWriter(ImageWriter):
    def __init__(
        self, device: str, manifest: OpenManifest, backend: str, path: Path, verify: bool
    ) -> None:
        super().__init__(device, manifest, backend)
        self.path = path
        self.verify = verify
        self.tiles: dict[TileKey, np.ndarray[Any, Any] | _Staged] = {}
        self.stored: StoredImage | None = None
        self._written = hashlib.sha1()

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        if not self.admit(key, pixels, self.tiles, self.stored is not None):
            return
        # A memory map holds a file descriptor; thousands of tiles would exhaust them, so a
        # staged tile is kept by name and mapped again, one at a time, when the file is written.
        filename = getattr(pixels, "filename", None)
        if isinstance(pixels, np.memmap) and filename and pixels.offset == 0:
            self.tiles[key] = _Staged(Path(filename), pixels.dtype, pixels.shape)
        else:
            self.tiles[key] = pixels

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self.require_complete(self.tiles)
        self._written = hashlib.sha1()
        atomic_write(self.path, self._write_file)
        digest = None
        if self.verify:
            held = _read_back(self.path)
            if held != self._written.hexdigest():
                remove(self.path)
                raise DigestMismatchError(
                    f"{self.path} read back other pixels than written (sha1 {held[:12]}…, "
                    f"written {self._written.hexdigest()[:12]}…)"
                )
            digest = f"sha1:{held}"
        self.stored = StoredImage(self.backend_name, str(self.path), digest=digest)
        self.tiles.clear()
        return self.stored

    def abort(self) -> None:
        self.tiles.clear()
        if self.stored is None:
            remove(self.path.with_name(f".{self.path.name}.partial"))

    def _write_file(self, tmp: Path) -> None:
        m = self.manifest
        shape = (m.size_t, m.size_c, m.size_z, m.tile_height, m.tile_width)
        key_values = self.image_key_values()
        held = {key.index for key in self.tiles}
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for position in m.positions:
                if position.index not in held:
                    continue  # not one tile of it: no series (the others name their position)
                planned = f"{position.x_um:g} {position.y_um:g} {position.z_um:g} um"
                tif.write(
                    self._planes(position.index),
                    shape=shape,
                    dtype=m.dtype.numpy,
                    photometric="minisblack",
                    metadata=ome_metadata(
                        m,
                        f"{m.image_name} position {position.index}",
                        position_planes(m, self.planes, position.index),
                        key_values
                        | {"planned_position": planned}
                        | missing_planes(m, position.index, self.tiles),
                    ),
                )

    def _planes(self, index: int) -> Iterator[np.ndarray[Any, Any]]:
        m = self.manifest
        blank = np.zeros((m.tile_height, m.tile_width), m.dtype.numpy)
        for t in range(m.size_t):
            for c in range(m.size_c):
                for z in range(m.size_z):
                    tile = self.tiles.get(TileKey(index, z, c, t), blank)
                    if isinstance(tile, _Staged):
                        tile = tile.load()
                    plane = np.ascontiguousarray(tile, dtype=m.dtype.numpy)
                    self._written.update(plane.tobytes())
                    yield plane


def _read_back(path: Path) -> str:
    """SHA-1 of the file's planes, one page at a time, as `_planes` digested them."""
    sha1 = hashlib.sha1()
    with disk_errors(f"reading back {path}"), tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            plane = page.asarray()
            sha1.update(plane.astype(plane.dtype.newbyteorder("<"), copy=False).tobytes())
    return sha1.hexdigest()


@dataclass(frozen=True)
class _Staged:
    path: Path
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def load(self) -> np.ndarray[Any, Any]:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)

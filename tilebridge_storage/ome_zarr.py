"""OME-Zarr mosaic: one multiscale image per scan, zarr v3 / OME-NGFF 0.5.

Layout: `root/<device>/<experiment>/<image_name>_<id8>.ome.zarr`, arrays `0`, `1`, ... of
axes (t, c, z, y, x), scale in micrometres (and the time interval in seconds on t) and
translation = stage position of the canvas origin (and the image's time offset on t), chunks
(1, 1, 1, chunk, chunk) (512 by default) so a browser viewer streams only what it shows;
zstd-compressed (zarr's default). Channel names, colours and display windows go in the
transitional `omero` block; the manifest's identity, key-values and the per-tile measured
metadata under `tilebridge`.

Tiles are painted into level 0 as they arrive, each over the canvas area it owns
(`mosaic` module), so arrival order never changes the result and no tile is kept in
memory. `finish()` builds each further level as the 2x2 mean of the previous one, chunk by
chunk, until a level fits in one chunk, writes and validates the NGFF metadata
(ome-zarr-models), fsyncs everything and renames the store into place.

Atomicity: everything is written under `.<name>.ome.zarr.partial/`, which has no NGFF
metadata until `finish()`; a reader therefore sees a whole, valid image or nothing. A new
attempt or `abort()` removes the partial store. A `finish()` that failed (disk full) can be
called again: levels are rebuilt from level 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from ome_zarr_models.v05.image import Image
from zarr.storage import LocalStore

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_runtime.durable import disk_errors, fsync_dir, fsync_file, remove
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.mosaic import (
    Mosaic,
    downsample_level,
    plan,
    pyramid_shapes,
    require_mosaic,
)
from tilebridge_storage.paths import check_writable, image_path

SUFFIX = ".ome.zarr"
AXES = ("t", "c", "z", "y", "x")
COLORS = ("0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00")


class OmeZarrBackend(StorageBackend):
    """docstring inherited"""

    kind = "ome_zarr"

    def __init__(self, root: Path, chunk: int = 512, name: str | None = None) -> None:
        super().__init__(name)
        self.root = Path(root)
        self.chunk = chunk

    def check(self) -> None:
        check_writable(self.root)

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        require_mosaic(manifest, self.name)
        path = image_path(self.root, device, manifest, SUFFIX)
        return _OmeZarrWriter(device, manifest, self.name, path, self.chunk)


class _OmeZarrWriter(ImageWriter):
    def __init__(
        self, device: str, manifest: OpenManifest, backend: str, path: Path, chunk: int
    ) -> None:
        super().__init__(device, manifest, backend)
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self.chunk = chunk
        self.mosaic = plan(manifest)
        self.written: set[TileKey] = set()
        self.group: zarr.Group | None = None
        self.level0: zarr.Array[Any] | None = None
        self.renamed = False
        self.stored: StoredImage | None = None

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        if not self.admit(key, pixels, self.written, self.stored is not None):
            return
        data = np.asarray(pixels, dtype=self.manifest.dtype.numpy)
        with disk_errors(f"writing {self.path}"):
            if self.level0 is None:
                self.level0 = self._new_level(self.mosaic.height, self.mosaic.width)
            level0 = self.level0
            for piece in self.mosaic.pieces_of(key.index):
                level0[(key.t, key.c, key.z, *piece.canvas.slices)] = data[piece.tile.slices]
        self.written.add(key)

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self.require_complete(self.written)
        with disk_errors(f"writing {self.path}"):
            if self.level0 is None:  # an image that holds no tile (see `expect`): all zeros
                self.level0 = self._new_level(self.mosaic.height, self.mosaic.width)
            # A retry after a failed parent fsync must not rebuild: the store has moved.
            if not self.renamed:
                self._build()
                _publish(self.partial, self.path)
                self.renamed = True
            fsync_dir(self.path.parent)
        self.group = self.level0 = None
        self.stored = StoredImage(self.backend_name, str(self.path))
        return self.stored

    def _build(self) -> None:
        """Pyramid levels and NGFF metadata, validated."""
        group = self._group()
        assert self.level0 is not None, "every tile is written, so level 0 exists"
        levels = [self.level0]
        for level, (height, width) in enumerate(
            pyramid_shapes(self.mosaic.height, self.mosaic.width, self.chunk)[1:], 1
        ):
            levels.append(self._new_level(height, width, level))
            downsample_level(levels[-2], levels[-1], self.chunk)
        group.update_attributes(self._attributes(levels))
        try:
            Image.from_zarr(group)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise PermanentError(f"invalid OME-Zarr metadata for {self.path}: {exc}") from exc

    def abort(self) -> None:
        if self.stored is None:
            self.group = self.level0 = None
            self.written.clear()
            remove(self.partial)

    def _group(self) -> zarr.Group:
        if self.group is None:
            # A fresh store: an earlier attempt's leftovers are replaced, never merged into.
            remove(self.partial)
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.create_group(store=LocalStore(self.partial), zarr_format=3)
        return self.group

    def _new_level(self, height: int, width: int, level: int = 0) -> zarr.Array[Any]:
        m = self.manifest
        return self._group().create_array(
            name=str(level),
            shape=(m.size_t, m.size_c, m.size_z, height, width),
            chunks=(1, 1, 1, self.chunk, self.chunk),
            dtype=m.dtype.numpy,
            fill_value=0,
            dimension_names=AXES,
            overwrite=True,
        )

    def _attributes(self, levels: list[zarr.Array[Any]]) -> dict[str, Any]:
        m = self.manifest
        return {
            "ome": {
                "version": "0.5",
                "multiscales": [multiscale(m, self.mosaic, len(levels))],
                "omero": omero_block(m, np.asarray(levels[-1][:])),
            },
            "tilebridge": tilebridge_block(m, self.device, self.planes, self.image_key_values()),
        }


def multiscale(m: OpenManifest, mosaic: Mosaic, levels: int) -> dict[str, Any]:
    """NGFF `multiscales[0]` (the same in 0.4 and 0.5): axes t, c, z, y, x with the time
    interval as the t scale (in seconds) and the image's time offset as its translation."""
    px, py, pz = m.pixel_size.x_um, m.pixel_size.y_um, m.pixel_size.z_um or 1.0
    dt = m.time_interval_s or 1.0
    datasets = []
    for level in range(levels):
        f = 2**level
        # A level-k pixel is the mean of f x f level-0 pixels: its centre shifts by (f-1)/2.
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [dt, 1.0, pz, py * f, px * f]},
                    {
                        "type": "translation",
                        "translation": [
                            m.time_offset_s,
                            0.0,
                            0.0,
                            mosaic.origin_y_um + (f - 1) * py / 2,
                            mosaic.origin_x_um + (f - 1) * px / 2,
                        ],
                    },
                ],
            }
        )
    space = {"type": "space", "unit": "micrometer"}
    time = {"type": "time", "unit": "second"} if m.time_interval_s else {"type": "time"}
    axes = [
        {"name": "t", **time},
        {"name": "c", "type": "channel"},
        *({"name": name, **space} for name in ("z", "y", "x")),
    ]
    return {"name": m.image_name, "axes": axes, "datasets": datasets, "type": "mean"}


def omero_block(m: OpenManifest, overview: np.ndarray[Any, Any]) -> dict[str, Any]:
    """The transitional `omero` block: channel names, colours and display windows (from the
    smallest level)."""
    channels = []
    for c in range(m.size_c):
        # Display window from the overview; the range is the pixel type's, if it has one.
        low, high = float(overview[:, c].min()), float(overview[:, c].max())
        kind = np.iinfo(m.dtype.numpy) if m.dtype.numpy.kind in "ui" else None
        full = (float(kind.min), float(kind.max)) if kind else (low, high)
        default = "FFFFFF" if m.size_c == 1 else COLORS[c % len(COLORS)]
        channels.append(
            {
                "label": m.channel_name(c),
                "color": m.channel_color(c) or default,
                "active": True,
                "window": {"min": full[0], "max": full[1], "start": low, "end": high},
            }
        )
    return {"channels": channels, "rdefs": {"model": "color"}}


def tilebridge_block(
    m: OpenManifest,
    device: str,
    planes: Mapping[TileKey, PlaneMeta],
    key_values: Mapping[str, str],
) -> dict[str, Any]:
    """What NGFF has no place for: the image's identity and key-values (with what it holds,
    `ImageWriter.image_key_values`), and per tile what was measured when it was taken."""
    return {
        "image_id": str(m.image_id),
        "device": device,
        "acquired_at": m.acquired_at.isoformat(),
        "key_values": dict(key_values),
        "planes": [
            {"tile": list(key), **meta.model_dump(exclude_none=True)}
            for key, meta in sorted(planes.items())
        ],
    }


def _publish(partial: Path, path: Path) -> None:
    """fsync the store bottom-up, then swap it in for any older version (the caller fsyncs
    the parent)."""
    for folder, _, files in os.walk(partial, topdown=False):
        for name in files:
            fsync_file(Path(folder, name))
        fsync_dir(Path(folder))
    remove(path)
    os.replace(partial, path)

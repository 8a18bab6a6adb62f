"""Stitched TIFF: the whole mosaic as one tiled, pyramidal BigTIFF OME-TIFF.

Layout: `root/<device>/<experiment>/<image_name>_<id8>.ome.tif`, axes TCZYX, 512 x 512
zlib-compressed tiles, each plane followed by its sub-resolutions in SubIFDs (each half the
previous, 2x2 mean, until one fits a tile): tifffile's documented pyramidal OME-TIFF, which
Fiji / Bio-Formats, QuPath and OMERO open as a pyramid. OME-XML carries pixel sizes,
channel names and colours, time increment, acquisition date, every plane's position (the
canvas origin; z as measured), exposure and DeltaT (`plane_metadata`), and the image's
key-values and the per-tile measurements as MapAnnotations.

Memory stays bounded whatever the mosaic size: tiles are painted, as they arrive, over the
area they own (`mosaic` module) into a disk-backed canvas (a memory map in
`.<name>.staging/` next to the output), so no tile is kept. The map is allocated in full up
front, so a full disk fails there with an error instead of a SIGBUS on a later page write.
`finish()` downsamples level by level into further maps, block by block, then streams the
levels tile by tile into the TIFF (atomic_write: written aside, fsynced, renamed), and
removes the staging folder. A failed `finish()` keeps the canvas, so it can be called again.

Two more kinds write the same way where ImSwitch puts its files (`paths.named_path`):
`stitched_tiff_named` (`root/<image_name>/stitched.ome.tif`) and `ome_tiff_stack`, ImSwitch's
`write_tiff` hyperstack (`root/<image_name>/<image_name>.ome.tif`, the same file without
sub-resolutions, which Fiji opens as one TCZYX hyperstack).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.durable import atomic_write, disk_errors, remove
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.mosaic import downsample_level, plan, pyramid_shapes, require_mosaic
from tilebridge_storage.paths import check_writable, claim, image_path, named_path, release
from tilebridge_storage.plane_metadata import measured_key_values, mosaic_planes
from tilebridge_storage.tiff_metadata import ome_metadata

SUFFIX = ".ome.tif"
Canvas = np.memmap[Any, np.dtype[Any]]


class StitchedTiffBackend(StorageBackend):
    """docstring inherited"""

    kind = "stitched_tiff"
    pyramid = True
    """Sub-resolutions in SubIFDs; without, one plain TCZYX hyperstack."""

    def __init__(self, root: Path, tile: int = 512, name: str | None = None) -> None:
        super().__init__(name)
        if tile % 16:
            raise ValueError(f"TIFF tiles are multiples of 16 pixels, not {tile}")
        self.root = Path(root)
        self.tile = tile

    def check(self) -> None:
        check_writable(self.root)

    def path_for(self, device: str, manifest: OpenManifest) -> Path:
        return image_path(self.root, device, manifest, SUFFIX)

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        require_mosaic(manifest, self.name)
        path = self.path_for(device, manifest)
        if self.claims:
            claim(path, manifest.image_id)
        return _StitchedTiffWriter(
            device, manifest, self.name, path, self.tile, self.pyramid, self.claims
        )

    claims = False
    """Outputs are claimed for their image (`paths.claim`): the named layouts below."""


class NamedStitchedTiffBackend(StitchedTiffBackend):
    """The stitched pyramid where ImSwitch writes it: `root/<image_name>/stitched.ome.tif`."""

    kind = "stitched_tiff_named"
    claims = True

    def path_for(self, device: str, manifest: OpenManifest) -> Path:
        return named_path(self.root, manifest, "{name}", "stitched.ome.tif")


class HyperstackTiffBackend(StitchedTiffBackend):
    """ImSwitch's `write_tiff`: the whole mosaic as one OME-TIFF hyperstack (TCZYX, tiled,
    no pyramid) at `root/<image_name>/<image_name>.ome.tif`, which Fiji opens as one
    hyperstack."""

    kind = "ome_tiff_stack"
    pyramid = False
    claims = True

    def path_for(self, device: str, manifest: OpenManifest) -> Path:
        return named_path(self.root, manifest, "{name}", "{name}.ome.tif")


class _StitchedTiffWriter(ImageWriter):
    def __init__(
        self,
        device: str,
        manifest: OpenManifest,
        backend: str,
        path: Path,
        tile: int,
        pyramid: bool,
        claimed: bool,
    ) -> None:
        super().__init__(device, manifest, backend)
        self.path = path
        self.staging = path.with_name(f".{path.name}.staging")
        self.tile = tile
        self.pyramid = pyramid
        self.claimed = claimed
        self.mosaic = plan(manifest)
        self.written: set[TileKey] = set()
        self.canvas: Canvas | None = None
        self.stored: StoredImage | None = None

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        if not self.admit(key, pixels, self.written, self.stored is not None):
            return
        with disk_errors(f"writing {self.path}"):
            if self.canvas is None:
                self._fresh_canvas()
            assert self.canvas is not None
            plane = self.canvas[key.t, key.c, key.z]
            for piece in self.mosaic.pieces_of(key.index):
                plane[piece.canvas.slices] = pixels[piece.tile.slices]
        self.written.add(key)

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self.require_complete(self.written)
        with disk_errors(f"writing {self.path}"):
            if self.canvas is None:  # an image that holds no tile (see `expect`): all zeros
                self._fresh_canvas()
            assert self.canvas is not None
            levels = [self.canvas]
            shapes = pyramid_shapes(self.mosaic.height, self.mosaic.width, self.tile)
            for level, (height, width) in enumerate(shapes[1:] if self.pyramid else [], 1):
                levels.append(self._allocate(level, height, width))
                downsample_level(levels[-2], levels[-1], self.tile)
            atomic_write(self.path, lambda tmp: self._write_tiff(tmp, levels))
        self.canvas = None
        remove(self.staging)
        self.stored = StoredImage(self.backend_name, str(self.path))
        return self.stored

    def abort(self) -> None:
        if self.stored is None:
            self.canvas = None
            self.written.clear()
            remove(self.staging)
            remove(self.path.with_name(f".{self.path.name}.partial"))
            if self.claimed and not self.path.exists():
                release(self.path)

    def _fresh_canvas(self) -> None:
        """An earlier attempt's leftovers are replaced, never reused."""
        remove(self.staging)
        self.staging.mkdir(parents=True)
        self.canvas = self._allocate(0, self.mosaic.height, self.mosaic.width)

    def _allocate(self, level: int, height: int, width: int) -> Canvas:
        m = self.manifest
        shape = (m.size_t, m.size_c, m.size_z, height, width)
        path = self.staging / f"level{level}.raw"
        with path.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, int(np.prod(shape)) * m.dtype.numpy.itemsize)
        return np.memmap(path, dtype=m.dtype.numpy, mode="r+", shape=shape)

    def _write_tiff(self, tmp: Path, levels: list[Canvas]) -> None:
        m = self.manifest
        px, py = m.pixel_size.x_um, m.pixel_size.y_um
        options: dict[str, Any] = {
            "tile": (self.tile, self.tile),
            "photometric": "minisblack",
            "compression": "zlib",
            "resolutionunit": "CENTIMETER",
        }
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for level, data in enumerate(levels):
                f = 2**level
                resolution = (1e4 / (px * f), 1e4 / (py * f))
                if level == 0:
                    tif.write(
                        data,
                        subifds=len(levels) - 1 or None,
                        resolution=resolution,
                        metadata=self._metadata(),
                        **options,
                    )
                else:
                    tif.write(data, subfiletype=1, resolution=resolution, **options)

    def _metadata(self) -> dict[str, Any]:
        m, mosaic = self.manifest, self.mosaic
        return ome_metadata(
            m,
            m.image_name,
            mosaic_planes(m, self.planes, mosaic.origin_x_um, mosaic.origin_y_um, self.holds),
            self.image_key_values(),
            measured_key_values(m, self.planes),
        )

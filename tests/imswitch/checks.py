"""Independent readers of everything an ImSwitch writer makes, checked pixel for pixel against
the frames the camera took, placed where their stage x/y says.

The expected canvas of a plane is built here from the scan's own geometry: a frame taken at
grid cell (ix, iy) starts at pixel ((x - x_start) / pixel, (y - y_start) / pixel); with steps
equal to the tile's extent (most tests) every frame shows whole, and cells never taken stay 0.
With overlap, the mosaic's documented ownership rule decides (`tilebridge_storage.mosaic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from ome_types import OME, from_xml
from ome_zarr_models.v04.image import Image

from tests.imswitch.imswitch_like import Camera
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.mosaic import assemble


@dataclass(frozen=True)
class Scan:
    """What the test knows of one writer's scan, independent of the adapter."""

    nx: int
    ny: int
    x0: float
    y0: float
    step: tuple[float, float]
    pixel_um: float
    camera: Camera
    time_point: int
    area: int
    channels: int  # logical channels (an RGB frame is 3 stored channels)
    planes: int

    @property
    def stored_channels(self) -> int:
        return self.channels * (3 if self.camera.rgb else 1)

    def frame(self, ix: int, iy: int, z: int, c: int) -> np.ndarray[Any, Any] | None:
        """The stored plane c (R, G, B split) at a cell, or None if never taken."""
        logical, sample = (c // 3, c % 3) if self.camera.rgb else (c, None)
        frame = self.camera.taken.get((self.time_point, self.area, ix, iy, z, logical))
        if frame is None:
            return None
        return frame if sample is None else frame[:, :, sample]

    def canvas(self, m: OpenManifest, z: int, c: int) -> np.ndarray[Any, Any]:
        h, w = self.camera.height, self.camera.width
        sx, sy = (round(s / self.pixel_um) for s in self.step)
        if sx >= w and sy >= h:  # no overlap: every frame shows whole at its stage position
            shape = ((self.ny - 1) * sy + h, (self.nx - 1) * sx + w)
            out = np.zeros(shape, m.dtype.numpy.newbyteorder("="))
            for iy in range(self.ny):
                for ix in range(self.nx):
                    frame = self.frame(ix, iy, z, c)
                    if frame is not None:
                        out[iy * sy : iy * sy + h, ix * sx : ix * sx + w] = frame
            return out
        tiles = {}
        for iy in range(self.ny):
            for ix in range(self.nx):
                frame = self.frame(ix, iy, z, c)
                tiles[iy * self.nx + ix] = frame if frame is not None else np.zeros((h, w))
        return assemble(m, tiles)

    def taken_keys(self, m: OpenManifest) -> set[TileKey]:
        """The image's tiles the camera took."""
        return {
            k for k in m.tile_keys()
            if self.frame(k.index % self.nx, k.index // self.nx, k.z, k.c) is not None
        }  # fmt: skip

    def position_planes(self, index: int) -> np.ndarray[Any, Any]:
        """(C, Z, Y, X) of one position (zeros where never taken)."""
        ix, iy = index % self.nx, index // self.nx
        h, w = self.camera.height, self.camera.width
        out = np.zeros((self.stored_channels, self.planes, h, w), self.camera.dtype)
        for c in range(self.stored_channels):
            for z in range(self.planes):
                frame = self.frame(ix, iy, z, c)
                if frame is not None:
                    out[c, z] = frame
        return out


def check_live_zarr(path: Path, m: OpenManifest, scan: Scan) -> dict[str, Any]:
    """ImSwitch's live view reads this: zarr v2, NGFF 0.4 (valid), every plane right."""
    assert (path / ".zattrs").exists() and (path / "0" / ".zarray").exists()
    group = zarr.open_group(path, mode="r", zarr_format=2)
    Image.from_zarr(group)
    attrs = group.attrs.asdict()
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert attrs["tilebridge"]["complete"] is True
    level0 = group["0"]
    for z in range(scan.planes):
        for c in range(scan.stored_channels):
            np.testing.assert_array_equal(level0[0, c, z], scan.canvas(m, z, c))  # type: ignore[index]
    return attrs


def check_mosaic_tiff(path: Path, m: OpenManifest, scan: Scan) -> OME:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = (
            series.levels[0]
            .asarray()
            .reshape(1, scan.stored_channels, scan.planes, *series.levels[0].shape[-2:])
        )
        ome = from_xml(tif.ome_metadata or "")
    for z in range(scan.planes):
        for c in range(scan.stored_channels):
            np.testing.assert_array_equal(data[0, c, z], scan.canvas(m, z, c))
    return ome


def check_frame_tiffs(folder: Path, m: OpenManifest, scan: Scan) -> None:
    """One file per frame taken under tiles/timepoint_<T>/, none for a frame never taken."""
    files = list(folder.rglob("*.ome.tif"))
    assert len(files) == len(scan.taken_keys(m))
    assert {f.parent.name for f in files} == {f"timepoint_{scan.time_point:04d}"}
    for path in files:
        with tifffile.TiffFile(path) as tif:
            pixels = tif.asarray()
            ome = from_xml(tif.pages[0].description)  # type: ignore[union-attr]
        tile = ome.structured_annotations.map_annotations[0].value["tile"]
        index, zs, cs, _ = tile.split()
        ix, iy = int(index) % scan.nx, int(index) // scan.nx
        expected = scan.frame(ix, iy, int(zs[1:]), int(cs[1:]))
        assert expected is not None
        np.testing.assert_array_equal(pixels, expected)


def check_archive(path: Path, m: OpenManifest, scan: Scan) -> OME:
    """The server's archive: one series per position that has a frame (each names it), its
    planes as acquired."""
    held = sorted({k.index for k in scan.taken_keys(m)})
    with tifffile.TiffFile(path) as tif:
        ome = from_xml(tif.ome_metadata or "")
        assert len(tif.series) == len(held)
        for index, image, series in zip(held, ome.images, tif.series, strict=True):
            assert image.name == f"{m.image_name} position {index}"
            data = series.asarray().reshape(1, m.size_c, m.size_z, m.tile_height, m.tile_width)
            np.testing.assert_array_equal(data[0], scan.position_planes(index))
        return ome


def check_omero(conn: Any, image_id: int, m: OpenManifest, scan: Scan) -> None:
    from tests.omero.helpers import read_pixels

    pixels = read_pixels(conn, image_id)
    assert pixels.shape[:3] == (1, scan.stored_channels, scan.planes)
    for z in range(scan.planes):
        for c in range(scan.stored_channels):
            np.testing.assert_array_equal(pixels[0, c, z], scan.canvas(m, z, c))


def tile_of(scan: Scan, ix: int, iy: int, z: int = 0, c: int = 0) -> TileKey:
    return TileKey(iy * scan.nx + ix, z, c, 0)

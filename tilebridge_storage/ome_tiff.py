"""OME-TIFF per stage position: the tiles as acquired, nothing stitched.

Layout: `root/<device>/<experiment>/<image_name>_<id8>/` holds one OME-TIFF per position,
`<image_name>_pos<index>.ome.tif`, with that position's planes (T, C, Z) as uncompressed
pages in XYZCT order, and OME-XML (built with ome-types) naming pixel sizes with units,
channel names and colours, time increment, acquisition date, every Plane's stage position
(measured where the acquisition said, else planned), exposure and DeltaT, the planned
position as a StageLabel, and the image's key-values as a MapAnnotation. Measured metadata
arrives with the close, after the files were created: `finish()` rewrites the OME-XML of the
positions it concerns (tifffile.tiffcomment). Fiji / Bio-Formats, QuPath and tifffile read
each file alone.

Memory: nothing is held. The first plane of a position creates its file with every page
allocated (header, OME-XML, empty strips); each plane is written into its page the moment it
arrives, so the caller may free the frame at once. A file is fsynced when its last plane
lands. Uncompressed pages are what make writing in place, in any order, possible.

An image that holds fewer tiles (`expect`) has no file for a position without any tile; a
position missing some planes keeps them as zero pages and says which in its key-values
(`tilebridge.missing_planes`, beside `tilebridge.incomplete` and the others).

Atomicity: files are written under `.<dir>.partial/`; `finish()` renames the whole directory
into place, so a reader sees every position or none, and a new attempt or `abort()` simply
removes the partial directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from ome_types import model as ome

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_runtime.durable import disk_errors, fsync_dir, fsync_file, remove
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.paths import check_writable, image_path
from tilebridge_storage.plane_metadata import missing_planes, position_planes
from tilebridge_storage.tiff_metadata import METADATA_NS

SUFFIX = ".ome.tif"
MICROMETER = ome.UnitsLength.MICROMETER
MILLISECOND = ome.UnitsTime.MILLISECOND
SECOND = ome.UnitsTime.SECOND
PIXEL_TYPES = {"float32": "float", "float64": "double"}
CLASSIC_TIFF_LIMIT = 2**31
"""Bytes above which a file is BigTIFF; below it, classic TIFF reaches the most readers."""


class OmeTiffBackend(StorageBackend):
    """docstring inherited"""

    kind = "ome_tiff"

    def __init__(self, root: Path, name: str | None = None) -> None:
        super().__init__(name)
        self.root = Path(root)

    def check(self) -> None:
        check_writable(self.root)

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        path = image_path(self.root, device, manifest, "")
        return _OmeTiffWriter(device, manifest, self.name, path)


@dataclass
class _Position:
    path: Path
    offsets: list[int]
    """File offset of each plane's pixels, by plane number (t, c, z order)."""
    remaining: int


class _OmeTiffWriter(ImageWriter):
    def __init__(self, device: str, manifest: OpenManifest, backend: str, path: Path) -> None:
        super().__init__(device, manifest, backend)
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self.written: set[TileKey] = set()
        self.open_positions: dict[int, _Position] = {}
        self.started = False
        self.renamed = False
        self.stored: StoredImage | None = None

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        if not self.admit(key, pixels, self.written, self.stored is not None):
            return
        m = self.manifest
        data = np.ascontiguousarray(pixels, dtype=m.dtype.numpy)
        with disk_errors(f"writing {self.path}"):
            if not self.started:
                # Whatever an earlier attempt left is replaced, never merged into.
                remove(self.partial)
                self.partial.mkdir(parents=True)
                self.started = True
            position = self.open_positions.get(key.index) or self._create(key.index)
            plane = (key.t * m.size_c + key.c) * m.size_z + key.z
            _pwrite_all(position.path, data.data.cast("B"), position.offsets[plane])
            self.written.add(key)
            position.remaining -= 1
            if position.remaining == 0:
                fsync_file(position.path)
                del self.open_positions[key.index]

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self.require_complete(self.written)
        with disk_errors(f"writing {self.path}"):
            if not self.renamed:  # a retry after a failed parent fsync only fsyncs again
                self._describe_measured()
                fsync_dir(self.partial)
                remove(self.path)
                os.replace(self.partial, self.path)
                self.renamed = True
            fsync_dir(self.path.parent)
        self.stored = StoredImage(self.backend_name, str(self.path))
        return self.stored

    def abort(self) -> None:
        if self.stored is None:
            remove(self.partial)
            self.written.clear()
            self.open_positions.clear()
            self.started = False

    def _describe_measured(self) -> None:
        """Rewrite the OME-XML of every position that got measured plane metadata, or all of
        them when the image holds fewer tiles (each file was described with the planned
        values, as if complete, when its first plane arrived)."""
        m = self.manifest
        written = {key.index for key in self.written}
        rewrite = written if self.holdings is not None else {key.index for key in self.planes}
        key_values = self.image_key_values()
        for index in sorted(rewrite & written):
            path = self.partial / self._file_name(index)
            extra = missing_planes(m, index, self.written)
            xml = ome_xml(m, index, self.planes, key_values | extra)
            tifffile.tiffcomment(path, comment=xml.encode())
            fsync_file(path)

    def _file_name(self, index: int) -> str:
        m = self.manifest
        digits = len(str(len(m.positions) - 1))
        return f"{m.image_name}_pos{index:0{digits}d}{SUFFIX}"

    def _create(self, index: int) -> _Position:
        m = self.manifest
        path = self.partial / self._file_name(index)
        planes = m.size_t * m.size_c * m.size_z
        with tifffile.TiffWriter(
            path, bigtiff=planes * m.tile_bytes > CLASSIC_TIFF_LIMIT, ome=False
        ) as tif:
            tif.write(
                None,
                shape=(planes, m.tile_height, m.tile_width),
                dtype=m.dtype.numpy,
                photometric="minisblack",
                rowsperstrip=m.tile_height,
                description=ome_xml(m, index, self.planes, self.image_key_values()).encode(),
                metadata=None,
            )
        with tifffile.TiffFile(path) as tif:
            offsets = [page.dataoffsets[0] for page in tif.pages]
        position = _Position(path, offsets, planes)
        self.open_positions[index] = position
        return position


def _pwrite_all(path: Path, data: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    finally:
        os.close(fd)


def ome_xml(
    m: OpenManifest, index: int, planes: Mapping[TileKey, PlaneMeta], key_values: Mapping[str, str]
) -> str:
    """OME-XML of one position's file: one Image, planes in XYZCT order, each at its measured
    stage position (the StageLabel keeps the planned one)."""
    pos = m.positions[index]
    pixels = ome.Pixels(
        id="Pixels:0",
        dimension_order="XYZCT",
        type=PIXEL_TYPES.get(m.dtype.value, m.dtype.value),
        size_x=m.tile_width,
        size_y=m.tile_height,
        size_z=m.size_z,
        size_c=m.size_c,
        size_t=m.size_t,
        physical_size_x=m.pixel_size.x_um,
        physical_size_x_unit=MICROMETER,
        physical_size_y=m.pixel_size.y_um,
        physical_size_y_unit=MICROMETER,
        physical_size_z=m.pixel_size.z_um,
        physical_size_z_unit=MICROMETER,
        time_increment=m.time_interval_s,
        time_increment_unit=SECOND,
        channels=[
            ome.Channel(
                id=f"Channel:0:{c}",
                name=m.channel_name(c),
                samples_per_pixel=1,
                **_color(m.channel_color(c)),
            )
            for c in range(m.size_c)
        ],
        tiff_data_blocks=[ome.TiffData(plane_count=m.size_t * m.size_c * m.size_z)],
        planes=[
            ome.Plane(
                the_t=p.the_t,
                the_c=p.the_c,
                the_z=p.the_z,
                position_x=p.position_x_um,
                position_x_unit=MICROMETER,
                position_y=p.position_y_um,
                position_y_unit=MICROMETER,
                position_z=p.position_z_um,
                position_z_unit=MICROMETER,
                exposure_time=p.exposure_ms,
                exposure_time_unit=MILLISECOND,
                delta_t=p.delta_t_s,
                delta_t_unit=SECOND,
            )
            for p in position_planes(m, planes, index)
        ],
    )
    annotations = ome.StructuredAnnotations()
    refs = []
    if key_values:
        annotations.map_annotations.append(
            ome.MapAnnotation(
                id="Annotation:0",
                namespace=METADATA_NS,
                value=ome.Map(ms=[ome.Map.M(k=k, value=v) for k, v in key_values.items()]),
            )
        )
        refs.append(ome.AnnotationRef(id="Annotation:0"))
    image = ome.Image(
        id="Image:0",
        name=f"{m.image_name} position {index}",
        acquisition_date=m.acquired_at,
        stage_label=ome.StageLabel(
            name=f"position {index}",
            x=pos.x_um,
            x_unit=MICROMETER,
            y=pos.y_um,
            y_unit=MICROMETER,
            z=pos.z_um,
            z_unit=MICROMETER,
        ),
        pixels=pixels,
        annotation_refs=refs,
    )
    return ome.OME(
        creator="tilebridge", images=[image], structured_annotations=annotations
    ).to_xml()


def _color(hex_rgb: str | None) -> dict[str, Any]:
    # ome-types refuses color=None: an absent colour is a missing field.
    return {} if hex_rgb is None else {"color": f"#{hex_rgb}"}

"""One OME-TIFF per frame, where ImSwitch's `write_individual_tiffs` puts them.

Layout (`paths.named_path`): `root/<image_name>/tiles/timepoint_<T>/` with one file per tile,
`x<x>_y<y>_z<z>_c<c>_<channel>_i<index>.ome.tif`: x and y the planned stage position in
nanometres (µm x 1000, as ImSwitch names them), z and c the plane's indices, index the stage
position, T the time point in the whole time-lapse (`first_time_point + t`). Each file is one
plane with OME-XML (ome-types): pixel size, channel name and colour, the plane's stage
position, exposure and DeltaT, the planned position as StageLabel, the image's key-values.

A frame is written the moment it arrives (aside, then renamed: a reader sees whole files
only), so nothing is held. Measured metadata comes with the close: `finish()` rewrites the
OME-XML of the files it concerns (tifffile.tiffcomment) and fsyncs files and folders. An
image that holds fewer tiles (`expect`) has a file per tile it holds, no other; each file's
key-values then say so (`tilebridge.incomplete`, `tilebridge.not_planned`, ...), so every
file is rewritten at `finish()`. The
`tiles` folder is claimed for its image (`paths.claim`); a new attempt of the same image
starts it afresh, `abort()` removes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from ome_types import model as ome

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_runtime.durable import disk_errors, fsync_dir, fsync_file, remove
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.paths import check_writable, claim, named_path, release
from tilebridge_storage.plane_metadata import position_planes
from tilebridge_storage.tiff_metadata import METADATA_NS

UM = ome.UnitsLength.MICROMETER
PIXEL_TYPES = {"float32": "float", "float64": "double"}


class FrameTiffsBackend(StorageBackend):
    """docstring inherited"""

    kind = "frame_tiffs"

    def __init__(self, root: Path, name: str | None = None) -> None:
        super().__init__(name)
        self.root = Path(root)

    def check(self) -> None:
        check_writable(self.root)

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        folder = named_path(self.root, manifest, "{name}", "tiles")
        claim(folder, manifest.image_id)
        return _FrameTiffsWriter(device, manifest, self.name, folder)


class _FrameTiffsWriter(ImageWriter):
    def __init__(self, device: str, manifest: OpenManifest, backend: str, folder: Path) -> None:
        super().__init__(device, manifest, backend)
        self.folder = folder
        self.written: set[TileKey] = set()
        self.started = False
        self.stored: StoredImage | None = None

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        if not self.admit(key, pixels, self.written, self.stored is not None):
            return
        m = self.manifest
        data = np.ascontiguousarray(pixels, dtype=m.dtype.numpy)
        path = self.path_of(key)
        with disk_errors(f"writing {path}"):
            if not self.started:
                remove(self.folder)  # an earlier attempt's frames are replaced, never mixed in
                self.started = True
            _write(path, data, frame_xml(m, key, self.planes, self.image_key_values()).encode())
        self.written.add(key)

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self.require_complete(self.written)
        with disk_errors(f"writing {self.folder}"):
            key_values = self.image_key_values()
            for key in sorted(self.written if self.holdings is not None else self.planes):
                path = self.path_of(key)
                xml = frame_xml(self.manifest, key, self.planes, key_values)
                tifffile.tiffcomment(path, comment=xml.encode())
            for key in sorted(self.written):
                fsync_file(self.path_of(key))
            for folder in sorted({self.path_of(key).parent for key in self.written}):
                fsync_dir(folder)
            fsync_dir(self.folder)
        self.stored = StoredImage(self.backend_name, str(self.folder))
        return self.stored

    def abort(self) -> None:
        if self.stored is None:
            remove(self.folder)
            release(self.folder)
            self.written.clear()
            self.started = False

    def path_of(self, key: TileKey) -> Path:
        m = self.manifest
        p = m.positions[key.index]
        digits = len(str(len(m.positions) - 1))
        name = (
            f"x{round(p.x_um * 1000)}_y{round(p.y_um * 1000)}_z{key.z}_c{key.c}_"
            f"{m.channel_name(key.c)}_i{key.index:0{digits}d}.ome.tif"
        )
        return self.folder / f"timepoint_{m.first_time_point + key.t:04d}" / name


def _write(path: Path, data: np.ndarray[Any, Any], description: bytes) -> None:
    """Written aside and renamed, so a reader sees whole files; fsynced by `finish()` (the
    frame is durable in the edge's buffer meanwhile, and an fsync per frame is slow on SD)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tifffile.TiffWriter(tmp, ome=False) as tif:
            tif.write(data, photometric="minisblack", description=description, metadata=None)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def frame_xml(
    m: OpenManifest,
    key: TileKey,
    planes: Mapping[TileKey, PlaneMeta],
    key_values: Mapping[str, str],
) -> str:
    """OME-XML of one frame's file."""
    values = position_planes(m, planes, key.index)
    plane = next(v for v in values if (v.the_t, v.the_c, v.the_z) == (key.t, key.c, key.z))
    planned = m.positions[key.index]
    color = m.channel_color(key.c)
    pixels = ome.Pixels(
        id="Pixels:0",
        dimension_order="XYZCT",
        type=PIXEL_TYPES.get(m.dtype.value, m.dtype.value),
        size_x=m.tile_width,
        size_y=m.tile_height,
        size_z=1,
        size_c=1,
        size_t=1,
        physical_size_x=m.pixel_size.x_um,
        physical_size_x_unit=UM,
        physical_size_y=m.pixel_size.y_um,
        physical_size_y_unit=UM,
        channels=[
            ome.Channel(
                id="Channel:0:0",
                name=m.channel_name(key.c),
                samples_per_pixel=1,
                **({"color": f"#{color}"} if color else {}),
            )
        ],
        tiff_data_blocks=[ome.TiffData(plane_count=1)],
        planes=[
            ome.Plane(
                the_t=0,
                the_c=0,
                the_z=0,
                position_x=plane.position_x_um,
                position_x_unit=UM,
                position_y=plane.position_y_um,
                position_y_unit=UM,
                position_z=plane.position_z_um,
                position_z_unit=UM,
                exposure_time=plane.exposure_ms,
                exposure_time_unit=ome.UnitsTime.MILLISECOND,
                delta_t=plane.delta_t_s,
                delta_t_unit=ome.UnitsTime.SECOND,
            )
        ],
    )
    key_values = dict(key_values) | {
        "tile": f"{key.index} z{key.z} c{key.c} t{m.first_time_point + key.t}"
    }
    image = ome.Image(
        id="Image:0",
        name=f"{m.image_name} position {key.index}",
        acquisition_date=m.acquired_at,
        stage_label=ome.StageLabel(
            name=f"position {key.index}", x=planned.x_um, x_unit=UM, y=planned.y_um, y_unit=UM
        ),
        pixels=pixels,
        annotation_refs=[ome.AnnotationRef(id="Annotation:0")],
    )
    annotations = ome.StructuredAnnotations(
        map_annotations=[
            ome.MapAnnotation(
                id="Annotation:0",
                namespace=METADATA_NS,
                value=ome.Map(ms=[ome.Map.M(k=k, value=v) for k, v in key_values.items()]),
            )
        ]
    )
    return ome.OME(
        creator="tilebridge", images=[image], structured_annotations=annotations
    ).to_xml()

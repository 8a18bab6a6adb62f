"""Creating the OMERO image(s) of one tilebridge image, each linked and marked at once.

`mosaic`: one image, the canvas of `mosaic.plan`. `per_tile`: one image per stage position,
named `<image_name> position <i>`, each with all Z/C/T planes of that position.

Order per image, so that a crash at any point leaves nothing a later attempt cannot find
(see `provenance`): `createImage` (its description marks it), then ONE save of the dataset
link, the provenance and metadata annotations and the tag links, then pixel sizes, channel
names and plane positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import Layout, OpenManifest, PixelType, PlaneMeta, StagePosition
from tilebridge_storage.base import Holdings
from tilebridge_storage.mosaic import Mosaic, plan
from tilebridge_storage.omero_backend.metadata import (
    METADATA_NS,
    annotation_link,
    dataset_link,
    describe,
    describe_measured,
    map_annotation,
    metadata_annotation,
    tag_annotations,
)
from tilebridge_storage.omero_backend.pixels import OneTile, PixelSink, Source
from tilebridge_storage.omero_backend.provenance import image_description, provenance_annotation
from tilebridge_storage.omero_backend.session import OmeroSession
from tilebridge_storage.omero_backend.targets import Target
from tilebridge_storage.plane_metadata import (
    measured_key_values,
    missing_planes,
    mosaic_planes,
    position_planes,
)

OMERO_PIXEL_TYPES = {
    PixelType.UINT8: "uint8",
    PixelType.INT8: "int8",
    PixelType.UINT16: "uint16",
    PixelType.INT16: "int16",
    PixelType.UINT32: "uint32",
    PixelType.INT32: "int32",
    PixelType.FLOAT32: "float",
    PixelType.FLOAT64: "double",
}


@dataclass(frozen=True)
class Created:
    image_id: int
    pixels_id: int
    source: Source
    indices: list[int]
    """The stage positions this image is made of."""
    provenance_id: int
    """Its provenance MapAnnotation (the verified digest is added to it at the end)."""


def create_images(
    session: OmeroSession,
    target: Target,
    device: str,
    manifest: OpenManifest,
    created: Callable[[int], None],
) -> list[Created]:
    """Create and describe every OMERO image; `created(id)` is told each new id at once,
    so the caller can delete them if a later step fails."""
    m = manifest
    pixels_type = session.query.findByString("PixelsType", "value", OMERO_PIXEL_TYPES[m.dtype])
    tags = tag_annotations(session, m.tags)
    out = []
    if m.layout is Layout.MOSAIC:
        mosaic = plan(m)
        origin = StagePosition(
            index=0, x_um=mosaic.origin_x_um, y_um=mosaic.origin_y_um, z_um=m.positions[0].z_um
        )
        parts: list[tuple[str, Source, list[int], StagePosition, int | None, Mosaic | None]] = [
            (m.image_name, mosaic, list(range(len(m.positions))), origin, None, mosaic)
        ]
    else:
        parts = [
            (
                f"{m.image_name} position {p.index}",
                OneTile(p.index, m.tile_height, m.tile_width),
                [p.index],
                p,
                p.index,
                None,
            )
            for p in sorted(m.positions, key=lambda p: p.index)
        ]
    for name, source, indices, position, index, layout in parts:
        image_id: int = session.pixels.createImage(
            source.width, source.height, m.size_z, m.size_t, list(range(m.size_c)),
            pixels_type, name, image_description(m.image_id),
        ).getValue()  # fmt: skip
        created(image_id)
        saved = session.update.saveAndReturnArray(
            [
                annotation_link(image_id, provenance_annotation(device, m, index)),
                dataset_link(target.dataset_id, image_id),
                annotation_link(image_id, metadata_annotation(device, m, index, layout)),
                *[annotation_link(image_id, tag) for tag in tags],
            ]
        )
        provenance_id: int = saved[0].getChild().getId().getValue()
        pixels_id = describe(session, image_id, m, position)
        out.append(Created(image_id, pixels_id, source, indices, provenance_id))
    return out


def describe_planes(
    session: OmeroSession,
    image_id: int,
    sink: PixelSink,
    manifest: OpenManifest,
    planes: Mapping[TileKey, PlaneMeta],
    holds: Callable[[TileKey], bool] = lambda key: True,
) -> None:
    """The measured metadata of the tiles one OMERO image is made of (see `plane_metadata`)."""
    m = manifest
    mine = {key: meta for key, meta in planes.items() if key.index in sink.indices}
    source = sink.source
    if isinstance(source, Mosaic):
        values = mosaic_planes(m, mine, source.origin_x_um, source.origin_y_um, holds)
    else:
        values = position_planes(m, mine, sink.indices[0])
    describe_measured(session, image_id, sink.pixels_id, values, measured_key_values(m, mine))


def describe_holdings(
    session: OmeroSession,
    image_id: int,
    sink: PixelSink,
    manifest: OpenManifest,
    holdings: Holdings,
) -> None:
    """What an image that holds fewer tiles says about it, beside its other key-values
    (`METADATA_NS`): `tilebridge.incomplete`, `tilebridge.tiles`, `tilebridge.not_planned`,
    and for one position's image (`per_tile`) the planes it lacks."""
    pairs = holdings.key_values(manifest)
    if len(sink.indices) == 1:
        pairs |= missing_planes(manifest, sink.indices[0], holdings.tiles)
    if pairs:
        annotation = map_annotation(METADATA_NS, sorted(pairs.items()))
        session.update.saveObject(annotation_link(image_id, annotation))

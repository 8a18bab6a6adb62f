"""What OMERO shows about an image besides its pixels.

On the image: name, acquisition date, a MapAnnotation in `METADATA_NS` (experiment, device,
stage positions, the manifest's key-values, time point, plate and well) and the manifest's
tags. On its pixels: physical pixel sizes in micrometres, the time increment, channel names
and colours, and one PlaneInfo per plane with the planned stage position (per_tile: the
tile's position; mosaic: the canvas origin). What was measured per tile arrives with the
close: `describe_measured` then sets each PlaneInfo's position, exposure and DeltaT
(`plane_metadata` rules) and adds the per-tile values as a MapAnnotation in `MEASURED_NS`.
Per-channel min/max is set by `pixels.PixelSink` once the pixels are written.
"""

from __future__ import annotations

from typing import Any

from tilebridge_protocol.messages import OpenManifest, StagePosition
from tilebridge_storage.mosaic import Mosaic
from tilebridge_storage.omero_backend._omero import UnitsLength, UnitsTime, omero
from tilebridge_storage.omero_backend.session import OmeroSession
from tilebridge_storage.plane_metadata import MEASURED_NS, PlaneValues, image_key_values

METADATA_NS = "tilebridge.org/metadata"

_TAG = "select t from TagAnnotation t where t.textValue = :text and t.details.owner.id = :uid"
_PIXELS = (
    "select p from Pixels p join fetch p.channels c join fetch c.logicalChannel "
    "where p.image.id = :id"
)
_PLANES = "select p from PlaneInfo p where p.pixels.id = :id"


def metadata_annotation(
    device: str, manifest: OpenManifest, position: int | None, mosaic: Mosaic | None
) -> Any:
    m = manifest
    pairs = [
        ("experiment", m.experiment),
        ("device", device),
        ("image_name", m.image_name),
        ("layout", m.layout.value),
        ("acquired_at", m.acquired_at.isoformat()),
        ("tile_size", f"{m.tile_width}x{m.tile_height}"),
        ("tiles", str(len(m.positions))),
    ]
    if mosaic is not None:
        pairs.append(("canvas_origin_um", f"{mosaic.origin_x_um},{mosaic.origin_y_um}"))
    shown = m.positions if position is None else (m.positions[position],)
    pairs += [(f"position {p.index}", _xyz(p)) for p in shown]
    pairs += sorted(image_key_values(m).items())
    return map_annotation(METADATA_NS, pairs)


def map_annotation(namespace: str, pairs: list[tuple[str, str]]) -> Any:
    ann = omero.model.MapAnnotationI()
    ann.setNs(omero.rtypes.rstring(namespace))
    ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs])
    return ann


def annotation_link(image_id: int, annotation: Any) -> Any:
    link = omero.model.ImageAnnotationLinkI()
    link.setParent(omero.model.ImageI(image_id, False))
    link.setChild(annotation)
    return link


def dataset_link(dataset_id: int, image_id: int) -> Any:
    link = omero.model.DatasetImageLinkI()
    link.setParent(omero.model.DatasetI(dataset_id, False))
    link.setChild(omero.model.ImageI(image_id, False))
    return link


def tag_annotations(session: OmeroSession, names: tuple[str, ...]) -> list[Any]:
    """The account's existing tags of these names (unloaded), new ones for the rest: tags
    are shared labels, so one "slide-7" tag serves every image that carries it."""
    tags = []
    for name in names:
        params = omero.sys.ParametersI()
        params.add("text", omero.rtypes.rstring(name))
        params.add("uid", omero.rtypes.rlong(session.user_id))
        found = sorted(
            session.query.findAllByQuery(_TAG, params), key=lambda t: t.getId().getValue()
        )
        if found:
            tags.append(omero.model.TagAnnotationI(found[0].getId().getValue(), False))
        else:
            tag = omero.model.TagAnnotationI()
            tag.setTextValue(omero.rtypes.rstring(name))
            tags.append(session.update.saveAndReturnObject(tag))
    return [omero.model.TagAnnotationI(t.getId().getValue(), False) for t in tags]


def describe(
    session: OmeroSession, image_id: int, manifest: OpenManifest, position: StagePosition
) -> int:
    """Set acquisition date, pixel sizes, channel names and plane positions; return the
    Pixels id."""
    m = manifest
    image = session.query.get("Image", image_id)
    image.setAcquisitionDate(omero.rtypes.rtime(int(m.acquired_at.timestamp() * 1000)))
    params = omero.sys.ParametersI()
    params.addId(image_id)
    pixels = session.query.findByQuery(_PIXELS, params)
    pixels.setPhysicalSizeX(_um(m.pixel_size.x_um))
    pixels.setPhysicalSizeY(_um(m.pixel_size.y_um))
    if m.pixel_size.z_um is not None:
        pixels.setPhysicalSizeZ(_um(m.pixel_size.z_um))
    if m.time_interval_s is not None:
        pixels.setTimeIncrement(omero.model.TimeI(m.time_interval_s, UnitsTime.SECOND))
    for c, channel in enumerate(
        sorted(pixels.copyChannels(), key=lambda ch: ch.getId().getValue())
    ):
        channel.getLogicalChannel().setName(omero.rtypes.rstring(m.channel_name(c)))
        color = m.channel_color(c)
        if color is not None:
            for i, setter in enumerate((channel.setRed, channel.setGreen, channel.setBlue)):
                setter(omero.rtypes.rint(int(color[2 * i : 2 * i + 2], 16)))
            channel.setAlpha(omero.rtypes.rint(255))
    pixels_id: int = pixels.getId().getValue()
    planes = []
    for t in range(m.size_t):
        for c in range(m.size_c):
            for z in range(m.size_z):
                plane = omero.model.PlaneInfoI()
                plane.setTheZ(omero.rtypes.rint(z))
                plane.setTheC(omero.rtypes.rint(c))
                plane.setTheT(omero.rtypes.rint(t))
                plane.setPositionX(_um(position.x_um))
                plane.setPositionY(_um(position.y_um))
                plane.setPositionZ(_um(position.z_um))
                plane.setPixels(omero.model.PixelsI(pixels_id, False))
                planes.append(plane)
    session.update.saveArray([image, pixels, *planes])
    return pixels_id


def describe_measured(
    session: OmeroSession,
    image_id: int,
    pixels_id: int,
    values: list[PlaneValues],
    measured: dict[str, str],
) -> None:
    """Set every PlaneInfo of `pixels_id` to `values` and link the per-tile measurements; in
    one save, so a retry finds either all of it or none."""
    params = omero.sys.ParametersI()
    params.addId(pixels_id)
    stored = {
        (p.getTheT().getValue(), p.getTheC().getValue(), p.getTheZ().getValue()): p
        for p in session.query.findAllByQuery(_PLANES, params)
    }
    changed = []
    for v in values:
        plane = stored.get((v.the_t, v.the_c, v.the_z))
        if plane is None:
            continue
        plane.setPositionX(_um(v.position_x_um))
        plane.setPositionY(_um(v.position_y_um))
        plane.setPositionZ(_um(v.position_z_um))
        if v.exposure_ms is not None:
            plane.setExposureTime(omero.model.TimeI(v.exposure_ms, UnitsTime.MILLISECOND))
        if v.delta_t_s is not None:
            plane.setDeltaT(omero.model.TimeI(v.delta_t_s, UnitsTime.SECOND))
        changed.append(plane)
    if measured:
        link = annotation_link(image_id, map_annotation(MEASURED_NS, sorted(measured.items())))
        changed.append(link)
    session.update.saveArray(changed)


def _um(value: float) -> Any:
    return omero.model.LengthI(value, UnitsLength.MICROMETER)


def _xyz(p: StagePosition) -> str:
    return f"{p.x_um},{p.y_um},{p.z_um} um"

"""Which OMERO images belong to a tilebridge image, so a new attempt can replace them.

Every image the backend creates is marked twice, both at once with its creation:

* its description is `tilebridge image <uuid>` (set by `createImage` itself, so even an
  image whose next call never happened is found), and
* a MapAnnotation in `PROVENANCE_NS` (key `image_id`, with device, protocol version and
  stage position index), saved in the same call as the image's dataset link. Its
  `description` holds the uuid too, because HQL can compare that column but not map values.

`open_image` deletes whatever carries either mark before it creates anything, so neither a
crash nor an interrupted pyramid leaves an orphan or a duplicate.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from tilebridge_protocol.messages import PROTOCOL_VERSION, OpenManifest
from tilebridge_storage.omero_backend._omero import omero
from tilebridge_storage.omero_backend.session import OmeroSession

log = logging.getLogger(__name__)

PROVENANCE_NS = "tilebridge.org/provenance"

_BY_ANNOTATION = (
    "select distinct l.parent.id from ImageAnnotationLink l join l.child a "
    "where a.ns = :ns and a.description = :uuid"
)
_BY_DESCRIPTION = "select i.id from Image i where i.description = :description"
# Tag/Term/File annotations may be shared with other images: a delete keeps them
# (as BlitzGateway.deleteObjects does by default); map annotations go with the image.
_KEEP = ["TagAnnotation", "TermAnnotation", "FileAnnotation"]


def image_description(image_id: UUID) -> str:
    return f"tilebridge image {image_id}"


def provenance_annotation(device: str, manifest: OpenManifest, position: int | None) -> Any:
    ann = omero.model.MapAnnotationI()
    ann.setNs(omero.rtypes.rstring(PROVENANCE_NS))
    ann.setDescription(omero.rtypes.rstring(str(manifest.image_id)))
    pairs = [
        ("image_id", str(manifest.image_id)),
        ("device", device),
        ("protocol_version", str(PROTOCOL_VERSION)),
        ("layout", manifest.layout.value),
    ]
    if position is not None:
        pairs.append(("position", str(position)))
    ann.setMapValue([omero.model.NamedValue(k, v) for k, v in pairs])
    return ann


def record_digest(session: OmeroSession, annotation_id: int, digest: str) -> None:
    """Add the verified pixel digest (`sha1:<hex>`, as OMERO computes it) to the image's
    provenance annotation: what tilebridge wrote can be checked against the image later."""
    ann = session.query.get("MapAnnotation", annotation_id)
    pairs = [nv for nv in ann.getMapValue() or [] if nv.name != "pixels_digest"]
    ann.setMapValue([*pairs, omero.model.NamedValue("pixels_digest", digest)])
    session.update.saveObject(ann)


def find_images(session: OmeroSession, image_id: UUID) -> list[int]:
    """Ids of every OMERO image made for `image_id` (by any earlier attempt)."""
    params = omero.sys.ParametersI()
    params.add("ns", omero.rtypes.rstring(PROVENANCE_NS))
    params.add("uuid", omero.rtypes.rstring(str(image_id)))
    rows = session.query.projection(_BY_ANNOTATION, params)
    params = omero.sys.ParametersI()
    params.add("description", omero.rtypes.rstring(image_description(image_id)))
    rows += session.query.projection(_BY_DESCRIPTION, params)
    return sorted({row[0].getValue() for row in rows if row and row[0] is not None})


def delete_images(session: OmeroSession, ids: list[int]) -> None:
    """Delete images with their pixels, links and map annotations; wait until done."""
    if not ids:
        return
    request = omero.cmd.Delete2(
        targetObjects={"Image": list(ids)},
        childOptions=[omero.cmd.graphs.ChildOption(excludeType=_KEEP)],
    )
    session.submit(request)
    log.info("deleted OMERO images %s of an earlier attempt", ids)

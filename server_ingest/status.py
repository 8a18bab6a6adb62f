"""What the ingest tells monitors: an image's retained status, built from the core's book, and
the instance's own status, built from the core's snapshot."""

from __future__ import annotations

from server_ingest.state import ImageBook, Snapshot
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import ImagePhase, ImageStatus, IngestStatus, Liveness


def image_status(book: ImageBook) -> ImageStatus:
    image, m = book.image, book.manifest
    error = image.delayed or (f"{image.reason.value}: {image.detail}" if image.reason else None)
    if image.phase is ImagePhase.EXPIRED:
        error = image.detail
    complete = image.phase is ImagePhase.COMPLETE
    close = book.close
    per_position = m.size_z * m.size_c * m.size_t
    return ImageStatus(
        at=utcnow(),
        device=image.key.device,
        image_id=image.key.image_id,
        experiment=m.experiment,
        image_name=m.image_name,
        phase=image.phase,
        tiles_total=m.tile_count,
        tiles_received=image.committed + len(book.assemblies) + len(book.sealing),
        tiles_committed=image.committed,
        tiles_stored=image.tile_count if complete else 0,
        locations=dict(image.locations),
        error=error,
        staged_bytes=book.in_staging * m.tile_bytes,
        digests=dict(image.digests),
        incomplete=close is not None and close.partial,
        tiles_not_planned=len(close.not_planned) * per_position if close else 0,
    )


def ingest_status(
    instance: str,
    snapshot: Snapshot,
    state: Liveness,
    connected: bool,
    connection_error: str | None,
) -> IngestStatus:
    return IngestStatus(
        at=utcnow(),
        instance=instance,
        state=state,
        broker_connected=connected,
        images_in_progress=snapshot.images_in_progress,
        staging_bytes=snapshot.staging_bytes,
        tiles_committed=snapshot.tiles_committed,
        chunks_rejected=sum(snapshot.rejections.values()),
        backends=dict(snapshot.backends),
        last_error=snapshot.last_error or connection_error,
        images_failed=snapshot.images_failed,
        images_waiting=dict(snapshot.waiting),
        attention=list(snapshot.attention),
        staging_free_bytes=snapshot.staging_free_bytes,
        disk_pressure=snapshot.disk_pressure,
    )

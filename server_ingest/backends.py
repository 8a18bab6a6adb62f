"""Which storage backends the ingest writes to: the configured kinds, made through the one
registry (`tilebridge_storage.registry`), so optional ones (OMERO) cost nothing unless
configured."""

from __future__ import annotations

from server_ingest.settings import IngestSettings
from tilebridge_protocol.errors import PermanentError
from tilebridge_storage import registry
from tilebridge_storage.base import StorageBackend


def build_backends(settings: IngestSettings) -> list[StorageBackend]:
    if not settings.backends:
        raise PermanentError("no storage backend configured")
    registry.check_known(settings.backends)
    return [
        registry.create(
            kind,
            folder=settings.archive_root
            if kind == "archive"
            else registry.folder_for(settings.data_dir, kind),
            omero=settings.omero,
        )
        for kind in settings.backends
    ]

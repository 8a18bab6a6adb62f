"""Which storage backends the ingest writes to, loaded by name so that optional ones
(OMERO) cost nothing unless configured."""

from __future__ import annotations

from collections.abc import Callable

from server_ingest.settings import IngestSettings
from tilebridge_protocol.errors import PermanentError
from tilebridge_storage.base import StorageBackend


def _archive(settings: IngestSettings) -> StorageBackend:
    from tilebridge_storage.archive import ArchiveBackend

    return ArchiveBackend(settings.archive_root)


FACTORIES: dict[str, Callable[[IngestSettings], StorageBackend]] = {"archive": _archive}


def build_backends(settings: IngestSettings) -> list[StorageBackend]:
    unknown = [name for name in settings.backends if name not in FACTORIES]
    if unknown:
        raise PermanentError(f"unknown backends {unknown}; available: {sorted(FACTORIES)}")
    if not settings.backends:
        raise PermanentError("no storage backend configured")
    return [FACTORIES[name](settings) for name in settings.backends]

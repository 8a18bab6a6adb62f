"""Which storage backends the ingest writes to, loaded by name so that optional ones
(OMERO) cost nothing unless configured."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from server_ingest.settings import IngestSettings
from tilebridge_protocol.errors import PermanentError
from tilebridge_storage.base import StorageBackend


def _archive(settings: IngestSettings) -> StorageBackend:
    from tilebridge_storage.archive import ArchiveBackend

    return ArchiveBackend(settings.archive_root)


def _local(kind: str) -> Callable[[IngestSettings], StorageBackend]:
    """The edge's local formats, also usable on the server (under `archive_root/<kind>`)."""

    def build(settings: IngestSettings) -> StorageBackend:
        from tilebridge_storage.ome_tiff import OmeTiffBackend
        from tilebridge_storage.ome_zarr import OmeZarrBackend
        from tilebridge_storage.stitched_tiff import StitchedTiffBackend

        classes: dict[str, type[StorageBackend]] = {
            "ome_tiff": OmeTiffBackend,
            "ome_zarr": OmeZarrBackend,
            "stitched_tiff": StitchedTiffBackend,
        }
        return classes[kind](settings.archive_root / kind)  # type: ignore[call-arg]

    return build


def _omero(settings: IngestSettings) -> StorageBackend:
    if importlib.util.find_spec("omero") is None:
        raise PermanentError("the omero backend needs omero-py: install the [omero] extra")
    if settings.omero is None:
        raise PermanentError("backend 'omero' is configured without an 'omero' settings section")
    from tilebridge_storage.omero_backend.backend import OmeroBackend

    return OmeroBackend(settings.omero)


FACTORIES: dict[str, Callable[[IngestSettings], StorageBackend]] = {
    "archive": _archive,
    "omero": _omero,
    "ome_tiff": _local("ome_tiff"),
    "ome_zarr": _local("ome_zarr"),
    "stitched_tiff": _local("stitched_tiff"),
}


def build_backends(settings: IngestSettings) -> list[StorageBackend]:
    unknown = [name for name in settings.backends if name not in FACTORIES]
    if unknown:
        raise PermanentError(f"unknown backends {unknown}; available: {sorted(FACTORIES)}")
    if not settings.backends:
        raise PermanentError("no storage backend configured")
    return [FACTORIES[name](settings) for name in settings.backends]

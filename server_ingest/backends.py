"""Which storage backends the ingest writes to: the configured kinds, made through the one
registry (`tilebridge_storage.registry`), so optional ones (OMERO) cost nothing unless
configured."""

from __future__ import annotations

from collections.abc import Sequence

from server_ingest.destinations import Destinations
from server_ingest.settings import IngestSettings
from tilebridge_protocol.errors import PermanentError
from tilebridge_storage import registry
from tilebridge_storage.base import StorageBackend


def build_backends(settings: IngestSettings) -> list[StorageBackend]:
    """One backend per configured kind; `omero` becomes one backend per OMERO target (named
    after it) when `omero_targets` names several servers."""
    if not settings.backends:
        raise PermanentError("no storage backend configured")
    registry.check_known(settings.backends)
    made = []
    for kind in settings.backends:
        if kind == "omero" and settings.omero_targets:
            made += [
                registry.create("omero", omero=target, name=name)
                for name, target in settings.omero_targets.items()
            ]
            continue
        folder = (
            settings.archive_root
            if kind == "archive"
            else registry.folder_for(settings.data_dir, kind)
        )
        made.append(registry.create(kind, folder=folder, omero=settings.omero))
    return made


def build_destinations(
    settings: IngestSettings, backends: Sequence[StorageBackend]
) -> Destinations:
    """Local backends for every image; OMERO targets as `routes` say (see destinations.py)."""
    return Destinations(
        [b.name for b in backends if b.kind != "omero"],
        [b.name for b in backends if b.kind == "omero"],
        settings.routes,
    )

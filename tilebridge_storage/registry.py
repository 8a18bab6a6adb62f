"""The one registry of storage backends, used by the edge and by the server.

Each kind is described here (what it is, what it needs, what it promises) and imported only
when a backend of that kind is made, so an optional dependency that is missing (omero-py on
the Pi) costs nothing until someone configures that kind, and then fails with the extra to
install instead of an ImportError at start-up.

    registry.create("ome_zarr", folder=Path("/data/ome_zarr"))
    registry.create("omero", omero=settings.omero, name="omero-facility")

Where a file backend writes is the caller's choice (`folder`); `folder_for` is the rule both
services use for their defaults, `<root>/<kind>`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tilebridge_protocol.errors import PermanentError
from tilebridge_storage.base import StorageBackend

if TYPE_CHECKING:
    from tilebridge_storage.omero_backend.settings import OmeroSettings

Needs = Literal["folder", "omero"]


@dataclass(frozen=True)
class BackendKind:
    """What the registry knows about one kind of storage before importing it."""

    kind: str
    summary: str
    implementation: str
    """`module:Class` of the StorageBackend, imported on first use."""
    needs: Needs
    """`folder`: a directory to write under; `omero`: an OMERO server's settings."""
    requires: tuple[str, ...] = ()
    """Modules that must be importable (beyond the base install)."""
    extra: str | None = None
    """The pip extra that provides `requires`."""
    keeps_references: bool = False
    """`write_tile` may keep the pixel array until `finish()`/`abort()` (see base.py)."""
    mosaic_only: bool = False
    """Refuses `per_tile` layouts: it stitches one canvas."""

    def unavailable(self) -> str | None:
        """Why a backend of this kind cannot be made here, or None."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        hint = f": install the [{self.extra}] extra" if self.extra else ""
        return f"the {self.kind} backend needs {', '.join(missing)}{hint}"

    def load(self) -> type[StorageBackend]:
        reason = self.unavailable()
        if reason is not None:
            raise PermanentError(reason)
        module, cls = self.implementation.split(":")
        backend: type[StorageBackend] = getattr(importlib.import_module(module), cls)
        return backend


KINDS: dict[str, BackendKind] = {
    k.kind: k
    for k in (
        BackendKind(
            "archive",
            "one OME-TIFF per image, every position a series, tiles as acquired",
            "tilebridge_storage.archive:ArchiveBackend",
            "folder",
            requires=("tifffile",),
            keeps_references=True,
        ),
        BackendKind(
            "ome_tiff",
            "one OME-TIFF per stage position, planes as acquired",
            "tilebridge_storage.ome_tiff:OmeTiffBackend",
            "folder",
            requires=("tifffile",),
        ),
        BackendKind(
            "ome_zarr",
            "an OME-Zarr (NGFF 0.5) mosaic with a pyramid",
            "tilebridge_storage.ome_zarr:OmeZarrBackend",
            "folder",
            requires=("zarr", "ome_zarr_models"),
            mosaic_only=True,
        ),
        BackendKind(
            "stitched_tiff",
            "one stitched, pyramidal OME-TIFF",
            "tilebridge_storage.stitched_tiff:StitchedTiffBackend",
            "folder",
            requires=("tifffile",),
            mosaic_only=True,
        ),
        BackendKind(
            "ome_zarr_v04",
            "an OME-Zarr (NGFF 0.4, zarr v2) mosaic written in place, viewable while it grows "
            "(ImSwitch's live view); at <folder>/<image_name>.ome.zarr",
            "tilebridge_storage.ome_zarr_v04:OmeZarrV04Backend",
            "folder",
            requires=("zarr", "numcodecs", "ome_zarr_models"),
            mosaic_only=True,
        ),
        BackendKind(
            "stitched_tiff_named",
            "one stitched, pyramidal OME-TIFF at <folder>/<image_name>/stitched.ome.tif",
            "tilebridge_storage.stitched_tiff:NamedStitchedTiffBackend",
            "folder",
            requires=("tifffile",),
            mosaic_only=True,
        ),
        BackendKind(
            "ome_tiff_stack",
            "the mosaic as one OME-TIFF hyperstack (TCZYX) at "
            "<folder>/<image_name>/<image_name>.ome.tif",
            "tilebridge_storage.stitched_tiff:HyperstackTiffBackend",
            "folder",
            requires=("tifffile",),
            mosaic_only=True,
        ),
        BackendKind(
            "frame_tiffs",
            "one OME-TIFF per frame under <folder>/<image_name>/tiles/timepoint_<t>/",
            "tilebridge_storage.frame_tiffs:FrameTiffsBackend",
            "folder",
            requires=("tifffile", "ome_types"),
        ),
        BackendKind(
            "omero",
            "an OMERO server, written by the ingest",
            "tilebridge_storage.omero_backend.backend:OmeroBackend",
            "omero",
            requires=("omero",),
            extra="omero",
            keeps_references=True,
        ),
    )
}


def kind(name: str) -> BackendKind:
    try:
        return KINDS[name]
    except KeyError:
        raise PermanentError(f"unknown storage backend {name!r}; known: {sorted(KINDS)}") from None


def check_known(names: Iterable[str]) -> None:
    """Raise PermanentError naming every unknown kind in `names` (settings validation)."""
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise PermanentError(f"unknown storage backends {unknown}; known: {sorted(KINDS)}")


def folder_for(root: Path, kind_name: str) -> Path:
    """Where a file backend of `kind_name` writes by default under a service's root."""
    return Path(root) / kind_name


def create(
    kind_name: str,
    *,
    folder: Path | None = None,
    omero: OmeroSettings | None = None,
    name: str | None = None,
) -> StorageBackend:
    """A backend of `kind_name`, named `name` (default: the kind)."""
    spec = kind(kind_name)
    make: Callable[..., StorageBackend] = spec.load()
    if spec.needs == "folder":
        if folder is None:
            raise PermanentError(f"the {kind_name} backend needs a folder to write under")
        return make(folder, name=name)
    if omero is None:
        raise PermanentError(
            f"backend {kind_name!r} is configured without an 'omero' settings section"
        )
    return make(omero, name=name)

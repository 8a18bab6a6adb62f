"""The storage interface: where the tiles of an image end up.

Every backend (local archive, OME-TIFF per tile, OME-Zarr mosaic, stitched TIFF, OMERO) is a
`StorageBackend` that opens one `ImageWriter` per image. The contract below is what the
ingest and the edge rely on; `tilebridge_storage.testing.StorageContract` checks it for every
backend (a third-party backend subclasses it too). Backends are made by name through
`tilebridge_storage.registry`.

Lifecycle of one image::

    writer = backend.open_image(device, manifest)   # once per attempt
    writer.write_tile(key, pixels)                  # every key of the manifest, any order
    writer.add_planes(planes)                       # measured metadata, any time before finish
    stored = writer.finish()                        # all tiles written -> durable result
    # or writer.abort() to discard a partial attempt

Promises every backend keeps:

* `open_image` never fails because an earlier attempt of the same `image_id` crashed half
  way: a new attempt replaces whatever partial output the old one left.
* `write_tile` takes the keys of `manifest.tile_keys()` in any order. `pixels` is a 2-D array
  `(tile_height, tile_width)` of the manifest's dtype (any byte order).
* Who owns `pixels`: the caller must not change them until `finish()` or `abort()` returns.
  A backend whose registry entry says `keeps_references` (it must write in its own order:
  OMERO pyramids, the archive) may keep a reference instead of a copy, so the caller counts
  those bytes as held until then (the server passes read-only memory maps of staged tiles,
  which cost no memory). Any other backend is done with `pixels` when `write_tile`
  returns, and the caller may reuse or release them at once.
  Writing a key again with identical pixels changes nothing. A key outside the manifest, or
  pixels of the wrong shape or dtype, raise `PermanentError` and change nothing.
* `finish()` requires every tile; with tiles missing it raises `PermanentError` naming them.
  Its result is durable when it returns (files fsynced / the server confirmed). Calling it
  again returns an equal `StoredImage` and changes nothing. After it, `write_tile` raises.
* `add_planes(planes)` may be called any number of times before `finish()`; each call adds
  (or replaces) the measured metadata of the tiles it names (`PlaneMeta`: stage position,
  exposure, time). `finish()` stores what it has in `self.planes` with the planes, where the
  format has a place for it; a tile without metadata keeps its planned position.
* `abort()` removes partial output; it is safe to call at any time, more than once.
* Faults say whether to retry: `TransientError` (unreachable, disk full, timeout: the caller
  keeps its data and tries again later) or `PermanentError` (permission, invalid target).
* A backend that verifies what it wrote (`StoredImage.digest`) reads it back before
  `finish()` returns and raises `DigestMismatchError` if it holds other pixels.
* Writers of different images may be used from different threads; one writer is used by
  one thread at a time.
* `check()` proves the target writable now (a folder, an OMERO login) or raises saying why;
  the ingest calls it at start-up, so an unwritable target is reported before any image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta


class DigestMismatchError(TransientError):
    """The backend holds other pixels than it was given (read back after writing). Its
    partial output is removed; the caller writes the image again, a bounded number of times,
    then gives up with `verify_failed`."""


@dataclass(frozen=True)
class StoredImage:
    """Where a finished image lives."""

    backend: str
    location: str
    """A path, or a backend URI such as `omero:Image:42`."""
    ids: dict[str, int] = field(default_factory=dict)
    """Backend object ids, e.g. {"image": 42, "dataset": 7} for OMERO."""
    digest: str | None = None
    """`sha1:<hex>` of the pixels the backend was read back to hold, if it verifies them."""


class ImageWriter(ABC):
    """Writes one image. See the module docstring for the contract."""

    def __init__(self, device: str, manifest: OpenManifest, backend_name: str) -> None:
        self.device = device
        self.manifest = manifest
        self.backend_name = backend_name
        """The `name` of the backend that opened this writer (what `StoredImage` names)."""
        self.planes: dict[TileKey, PlaneMeta] = {}
        """Measured metadata per tile, given by `add_planes` (see the contract)."""

    @abstractmethod
    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None: ...

    @abstractmethod
    def finish(self) -> StoredImage: ...

    @abstractmethod
    def abort(self) -> None: ...

    def add_planes(self, planes: Mapping[TileKey, PlaneMeta]) -> None:
        """Record measured metadata for `finish()` to store (see the contract)."""
        for key, meta in planes.items():
            if not self.manifest.has_tile(key):
                raise PermanentError(
                    f"tile {tuple(key)} is not part of image {self.manifest.image_id}"
                )
            self.planes[key] = meta

    def admit(
        self, key: TileKey, pixels: np.ndarray[Any, Any], written: Collection[TileKey], done: bool
    ) -> bool:
        """The common start of `write_tile`: refuse after `finish()`, check the tile against
        the manifest, and say whether it is new (False: a duplicate, to be ignored)."""
        if done:
            raise PermanentError(f"image {self.manifest.image_id} is already finished")
        self.check_tile(key, pixels)
        return key not in written

    def check_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        """Raise PermanentError unless `key` and `pixels` fit the manifest."""
        m = self.manifest
        if not m.has_tile(key):
            raise PermanentError(f"tile {tuple(key)} is not part of image {m.image_id}")
        if pixels.shape != (m.tile_height, m.tile_width):
            raise PermanentError(
                f"tile {tuple(key)} has shape {pixels.shape}, "
                f"expected {(m.tile_height, m.tile_width)}"
            )
        if pixels.dtype.newbyteorder("=") != m.dtype.numpy.newbyteorder("="):
            raise PermanentError(f"tile {tuple(key)} has dtype {pixels.dtype}, expected {m.dtype}")

    def missing(self, written: set[TileKey] | dict[TileKey, Any]) -> list[TileKey]:
        return [k for k in self.manifest.tile_keys() if k not in written]

    def require_complete(self, written: set[TileKey] | dict[TileKey, Any]) -> None:
        missing = self.missing(written)
        if missing:
            shown = ", ".join(str(tuple(k)) for k in missing[:5])
            raise PermanentError(
                f"image {self.manifest.image_id} is missing {len(missing)} tiles ({shown})"
            )


class StorageBackend(ABC):
    """A storage target; opens one writer per image.

    `kind` names the implementation in the registry (`tilebridge_storage.registry`); `name`
    names this target in status, locations and the ledger. They are equal unless the
    composition root names targets itself (two OMERO servers, say)."""

    kind: ClassVar[str]

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind

    @abstractmethod
    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter: ...

    def check(self) -> None:  # noqa: B027 - optional hook
        """Prove the target can be written now (a file backend: its folder; OMERO: a login);
        raise `TransientError` or `PermanentError` saying why not. Called at start-up."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; writers already finished stay valid."""

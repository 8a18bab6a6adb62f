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
    writer.expect(holdings)                         # only if the image holds fewer tiles
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
* `expect(holdings)`: the image holds exactly `holdings.tiles`, fewer than its manifest
  declares (a sparse image: positions never planned, `holdings.not_planned`; a partial one:
  the acquisition ended early, `holdings.partial`). Called at most once, at any time before
  `finish()` (before the first tile or after the last); from then on `write_tile` refuses a
  key outside the holdings and `finish()` requires exactly those tiles (a tile written
  before that the image does not hold is a `PermanentError` at `finish()`). What is not
  there is never invented: a canvas stays 0 over the area a missing tile would own (its
  ownership is the plan's, never the arrivals'); a per-position output omits a position
  without tiles; every backend records `holdings.key_values()` with the image's own
  key-values (`tilebridge.incomplete`, `tilebridge.tiles`, `tilebridge.not_planned`).
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
from tilebridge_protocol.messages import CloseManifest, OpenManifest, PlaneMeta
from tilebridge_storage.plane_metadata import image_key_values


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


@dataclass(frozen=True)
class Holdings:
    """Which tiles an image holds when that is fewer than its manifest declares."""

    tiles: frozenset[TileKey]
    not_planned: frozenset[int] = frozenset()
    """Positions the acquisition never planned (a round scan area's empty grid cells): none
    of their tiles is missing."""
    partial: bool = False
    """The acquisition ended early: planned tiles are missing, the image is incomplete."""

    @classmethod
    def of(cls, manifest: OpenManifest, close: CloseManifest) -> Holdings | None:
        """What a close says the image holds; None when that is every tile."""
        if not close.partial and not close.not_planned:
            return None
        return cls(
            frozenset(d.tile for d in close.digests), frozenset(close.not_planned), close.partial
        )

    def planned(self, manifest: OpenManifest) -> int:
        """Tiles the acquisition planned: the manifest's, less those never planned."""
        per_position = manifest.size_z * manifest.size_c * manifest.size_t
        return manifest.tile_count - len(self.not_planned) * per_position

    def key_values(self, manifest: OpenManifest) -> dict[str, str]:
        """What every backend records with the image's key-values."""
        out = {}
        if self.partial:
            out["tilebridge.incomplete"] = "true"
            out["tilebridge.tiles"] = f"{len(self.tiles)}/{self.planned(manifest)}"
        if self.not_planned:
            out["tilebridge.not_planned"] = _ranges(sorted(self.not_planned))
        return out


def _ranges(indices: list[int], limit: int = 1024) -> str:
    """`0-3, 7, 12-15`: positions as ranges, cut short to fit a key-value."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 4].rsplit(", ", 1)[0] + ", ..."


class ImageWriter(ABC):
    """Writes one image. See the module docstring for the contract."""

    def __init__(self, device: str, manifest: OpenManifest, backend_name: str) -> None:
        self.device = device
        self.manifest = manifest
        self.backend_name = backend_name
        """The `name` of the backend that opened this writer (what `StoredImage` names)."""
        self.planes: dict[TileKey, PlaneMeta] = {}
        """Measured metadata per tile, given by `add_planes` (see the contract)."""
        self.holdings: Holdings | None = None
        """Set by `expect`: the tiles this image holds, when fewer than the manifest's."""

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

    def expect(self, holdings: Holdings) -> None:
        """The image holds exactly `holdings.tiles` (see the contract). A backend that must
        act on it (write what waited for a missing tile) extends this."""
        m = self.manifest
        stray = next((k for k in holdings.tiles if not m.has_tile(k)), None)
        if stray is not None:
            raise PermanentError(f"tile {tuple(stray)} is not part of image {m.image_id}")
        if self.holdings is not None and self.holdings != holdings:
            raise PermanentError(f"image {m.image_id} was told other holdings before")
        self.holdings = holdings

    def holds(self, key: TileKey) -> bool:
        """Whether the image holds `key` (every key of the manifest until `expect`)."""
        return self.holdings is None or key in self.holdings.tiles

    def image_key_values(self) -> dict[str, str]:
        """The image's key-values as every backend stores them: the manifest's own (and what
        its optional fields say), and what `expect` said of the tiles it holds."""
        extra = self.holdings.key_values(self.manifest) if self.holdings is not None else {}
        return image_key_values(self.manifest) | extra

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
        if not self.holds(key):
            raise PermanentError(
                f"tile {tuple(key)} is not among the tiles image {m.image_id} holds"
            )
        if pixels.shape != (m.tile_height, m.tile_width):
            raise PermanentError(
                f"tile {tuple(key)} has shape {pixels.shape}, "
                f"expected {(m.tile_height, m.tile_width)}"
            )
        if pixels.dtype.newbyteorder("=") != m.dtype.numpy.newbyteorder("="):
            raise PermanentError(f"tile {tuple(key)} has dtype {pixels.dtype}, expected {m.dtype}")

    def missing(self, written: set[TileKey] | dict[TileKey, Any]) -> list[TileKey]:
        return [k for k in self.manifest.tile_keys() if k not in written and self.holds(k)]

    def require_complete(self, written: set[TileKey] | dict[TileKey, Any]) -> None:
        stray = next((k for k in written if not self.holds(k)), None)
        if stray is not None:
            raise PermanentError(
                f"image {self.manifest.image_id} was given tile {tuple(stray)}, which it does "
                "not hold"
            )
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

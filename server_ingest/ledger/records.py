"""What the ledger stores: typed records, written in order by one writer, and what it gives back.

Every image is keyed by `(device, image_id)`: a device names its own images, so another
device using the same UUID gets an image of its own and can never touch this one. Reasons are
a `ReasonCode` plus a free-text detail, two columns, never one "code: detail" string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple
from uuid import UUID

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase


class ImageKey(NamedTuple):
    device: str
    image_id: UUID

    def __str__(self) -> str:
        return f"{self.device}/{self.image_id}"


@dataclass(frozen=True, slots=True)
class ImageOpened:
    """An accepted open (again, after a refusal or expiry): the image is receiving."""

    key: ImageKey
    manifest: OpenManifest
    at: float


@dataclass(frozen=True, slots=True)
class ImageRefused:
    """An open refused for good; kept so a repeated open is answered the same way."""

    key: ImageKey
    reason: ReasonCode
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class TileStaged:
    key: ImageKey
    tile: TileKey
    digest: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class CloseReceived:
    key: ImageKey
    close: CloseManifest


@dataclass(frozen=True, slots=True)
class PhaseSet:
    key: ImageKey
    phase: ImagePhase
    at: float
    reason: ReasonCode | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class BackendStored:
    """One backend finished the image: never written there again, also after a restart."""

    key: ImageKey
    backend: str
    location: str
    digest: str | None = None
    """What the backend was verified to hold (see `ImageAck.digests`); None: not verified."""


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A message the ingest failed on for a reason of its own, kept for an administrator."""

    at: float
    device: str
    topic: str
    reason: ReasonCode
    detail: str
    payload: bytes
    payload_bytes: int
    """Size of the message as received (`payload` may be cut short)."""


Record = (
    ImageOpened
    | ImageRefused
    | TileStaged
    | CloseReceived
    | PhaseSet
    | BackendStored
    | DeadLettered
)


@dataclass(frozen=True)
class StoredImage:
    """An image as the ledger holds it (what recovery and look-ups return)."""

    key: ImageKey
    phase: ImagePhase
    manifest: OpenManifest | None
    close: CloseManifest | None
    reason: ReasonCode | None
    detail: str | None
    updated: float
    locations: Mapping[str, str] = field(default_factory=dict)
    tiles: Mapping[TileKey, bytes] = field(default_factory=dict)
    """Digests of the staged tiles; filled only for images whose tiles are still staged."""
    digests: Mapping[str, str] = field(default_factory=dict)
    """Backend -> verified digest, for the backends that recorded one."""


@dataclass(frozen=True)
class DeadLetter:
    id: int
    at: float
    device: str
    topic: str
    reason: ReasonCode
    detail: str
    payload: bytes
    payload_bytes: int


HOLDS_STAGED_TILES = frozenset(
    {ImagePhase.RECEIVING, ImagePhase.STORING, ImagePhase.FAILED, ImagePhase.EXPIRED}
)
"""Phases whose tiles are (or may be) in staging: loaded at start-up with their digests."""

"""The lifecycle's data: the image state, the events it takes and the effects it asks for.
Frozen values only; `machine.step` is the function between them."""

from __future__ import annotations

from dataclasses import dataclass

from server_ingest.ledger.records import ImageKey, Record
from tilebridge_protocol.framing import tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import AnyAck, CloseManifest, OpenManifest
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase

DISCARDED_DETAIL = "discarded by an administrator"


@dataclass(frozen=True)
class Policy:
    image_ttl_s: float = 24 * 3600.0
    """A receiving image without a tile or a close for this long expires."""
    keep_staged: bool = False


@dataclass(frozen=True, slots=True)
class Image:
    key: ImageKey
    phase: Phase
    manifest_id: bytes | None = None
    """Digest of the accepted open manifest: a repeated open must match it."""
    tile_count: int = 0
    """Tiles the image will hold: the open's, then (once closed) those its close lists."""
    committed: int = 0
    """Tiles sealed in staging (their commit acks follow their records' durability); once
    closed, only those its close lists."""
    closed: bool = False
    close_shape: bytes | None = None
    """`CloseManifest.shape()` of the first close: a later close must agree with it."""
    locations: tuple[tuple[str, str], ...] = ()
    reason: ReasonCode | None = None
    detail: str | None = None
    delayed: str | None = None
    """Why storing waits (a backend unreachable); None while all is well."""
    last_seen: float = 0.0
    digests: tuple[tuple[str, str], ...] = ()
    """Backend -> digest of the pixels it verified holding (read back after writing)."""

    @property
    def all_in(self) -> bool:
        return self.closed and self.committed >= self.tile_count > 0


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    at: float
    manifest: OpenManifest


@dataclass(frozen=True, slots=True)
class OpenRefused:
    at: float
    reason: ReasonCode
    detail: str


@dataclass(frozen=True, slots=True)
class Staged:
    """A tile is sealed in staging (verified, fsynced); the core never posts one twice."""

    at: float
    tile: TileKey
    digest: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class Closed:
    at: float
    close: CloseManifest
    conflicts: int
    """Staged tiles whose digest differs from the close's (counted by the core)."""
    committed: int | None = None
    """Of the tiles the close lists, those staged already (the core dropped any staged tile
    it leaves out); None: every staged tile is listed."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One backend finished the image (and, with `digest`, verified what it holds)."""

    backend: str
    location: str
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class StoreDone:
    at: float


@dataclass(frozen=True, slots=True)
class StoreDelayed:
    backend: str
    detail: str


@dataclass(frozen=True, slots=True)
class StoreFailed:
    at: float
    backend: str
    reason: ReasonCode
    detail: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: float


@dataclass(frozen=True, slots=True)
class Retry:
    """Admin (`server-ingest images retry`): store a failed image again from staging."""

    at: float


@dataclass(frozen=True, slots=True)
class Discard:
    """Admin (`server-ingest images discard`) or the retention policy: drop the image and its
    staged tiles; `detail` says who and why (the device is told it)."""

    at: float
    detail: str = DISCARDED_DETAIL


Event = (
    Opened
    | OpenRefused
    | Staged
    | Closed
    | Stored
    | StoreDone
    | StoreDelayed
    | StoreFailed
    | Tick
    | Retry
    | Discard
)


# -- effects ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    ack: AnyAck


@dataclass(frozen=True, slots=True)
class StoreBegin:
    """Open the backends' writers and feed them every tile staged so far."""


@dataclass(frozen=True, slots=True)
class StoreTile:
    tile: TileKey


@dataclass(frozen=True, slots=True)
class StoreFinish:
    """Every tile is staged and the close is in: finish every backend (with its planes)."""


@dataclass(frozen=True, slots=True)
class StoreCancel:
    pass


@dataclass(frozen=True, slots=True)
class Publish:
    force: bool = False


@dataclass(frozen=True, slots=True)
class RemoveStaging:
    pass


@dataclass(frozen=True, slots=True)
class Forget:
    """The image may leave memory: the ledger answers for it from now on."""


@dataclass(frozen=True, slots=True)
class Persist:
    records: tuple[Record, ...]
    then: tuple[Effect, ...] = ()


Effect = (
    Send
    | StoreBegin
    | StoreTile
    | StoreFinish
    | StoreCancel
    | Publish
    | RemoveStaging
    | Forget
    | Persist
)


@dataclass(frozen=True, slots=True)
class Step:
    image: Image | None
    effects: tuple[Effect, ...] = ()


def manifest_id(manifest: OpenManifest) -> bytes:
    return tile_digest(manifest.to_bytes())

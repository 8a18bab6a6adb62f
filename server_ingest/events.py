"""What arrives in the core's inbox: device messages from the network thread, and the
results of the work the core handed out (staging, ledger, storer). Frozen data only."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum

from server_ingest.ledger.records import ImageKey, StoredImage
from server_ingest.lifecycle import Event as LifecycleEvent
from tilebridge_protocol.keys import TileKey


@dataclass(frozen=True, slots=True)
class Inbound:
    """A device message as the broker delivered it."""

    topic: str
    payload: bytes
    retained: bool = False
    relayed: bool = False
    """Forwarded by the instance that got it from the broker (docs/scale.md)."""


@dataclass(frozen=True, slots=True)
class TileRef:
    """One reassembly of one tile; `generation` tells a restarted reassembly from the old."""

    key: ImageKey
    tile: TileKey
    generation: int


@dataclass(frozen=True, slots=True)
class ChunkWritten:
    ref: TileRef
    chunk_index: int
    error: str | None = None
    """Why the chunk is not on disk (e.g. the disk is full); None: written."""


class Seal(Enum):
    SEALED = "sealed"
    MISMATCH = "mismatch"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TileSealed:
    ref: TileRef
    outcome: Seal
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class StagingDone:
    """A staging job that answers nothing (removing an image's files) finished."""

    key: ImageKey


@dataclass(frozen=True, slots=True)
class Durable:
    """Every record of these Persist tokens (and all before them) is on disk."""

    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Looked:
    key: ImageKey
    image: StoredImage | None


@dataclass(frozen=True, slots=True)
class LedgerTrouble:
    detail: str | None
    """Why the ledger cannot write now (retrying); None: writing again."""


@dataclass(frozen=True, slots=True)
class ForImage:
    """A lifecycle event about one image (from the storer or an admin)."""

    key: ImageKey
    event: LifecycleEvent


@dataclass(frozen=True, slots=True)
class BackendHealth:
    backend: str
    state: str
    """"ok", or the last error."""


@dataclass(frozen=True, slots=True)
class StoreAttempt:
    """One try at writing one image into one backend, for the metrics."""

    backend: str
    outcome: str
    """"ok", "retry" (transient fault) or "failed" (permanent)."""
    seconds: float
    nbytes: int


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a device now (the claims thread's answer); `images` are the device's images
    with staged tiles when we just took it over, for the core to hold and resume."""

    device: str
    holder: str
    valid_s: float
    images: tuple[StoredImage, ...] = ()


@dataclass(frozen=True, slots=True)
class DiskSpace:
    """Free bytes on the staging disk (from the "ingest-disk" thread)."""

    free: int


@dataclass(frozen=True, slots=True)
class StagingSwept:
    """Kept staged copies of stored images removed by the retention policy."""

    removed: int
    freed: int


@dataclass(frozen=True, slots=True)
class AdminAnswer:
    ok: bool
    phase: str | None
    """The image's phase after the command (None: the core does not hold the image)."""
    message: str


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """An administrator's command about one image (`server-ingest images retry|discard`),
    from the control socket; the core applies it like any event and answers in `reply`."""

    key: ImageKey
    event: LifecycleEvent
    reply: Future[AdminAnswer]
    by: str
    """Who asked (for the log): e.g. `uid 0`."""


@dataclass(frozen=True, slots=True)
class Barrier:
    """Posted by `Engine.wait_idle`: set `done` once nothing is in flight."""

    token: int


InboxItem = (
    Inbound | ChunkWritten | TileSealed | StagingDone | Durable | Looked | LedgerTrouble
    | ForImage | BackendHealth | StoreAttempt | Owner | AdminRequest | DiskSpace
    | StagingSwept | Barrier
)  # fmt: skip

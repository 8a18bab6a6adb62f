"""Everything the core thread owns, and the read-only snapshot it publishes for others.

Only the core thread touches `CoreState`. Status, metrics and tests read `Snapshot`, a frozen
copy the core replaces (one reference assignment) when something changed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from server_ingest.assembler import TileAssembly
from server_ingest.ledger.records import HOLDS_STAGED_TILES, ImageKey, StoredImage
from server_ingest.lifecycle import Image, manifest_id
from server_ingest.limits import DeviceBook
from server_ingest.settings import Limits
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest
from tilebridge_protocol.status import HeldImage
from tilebridge_protocol.status import ImagePhase as Phase

ATTENTION_SHOWN = 20
"""Failed and abandoned images listed in the ingest's status (all are in `images list`)."""

FINISHED_KEPT = 4096
"""Finished images answered from memory (late resends, repeated closes) before the ledger."""

# Image writes take from milliseconds (a small archive image) to many minutes (OMERO pyramids).
STORE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass
class ImageBook:
    """An image the core holds: its lifecycle state and its tiles' bookkeeping."""

    image: Image
    manifest: OpenManifest
    close: CloseManifest | None = None
    staged: dict[TileKey, bytes] = field(default_factory=dict)
    assemblies: dict[TileKey, TileAssembly] = field(default_factory=dict)
    sealing: dict[TileKey, TileAssembly] = field(default_factory=dict)
    last_published: float = 0.0
    close_digests: dict[TileKey, bytes] | None = None
    manifest_size: int = 0
    """JSON bytes of the manifest: what the manifest-memory limit counts."""
    phase_since: float = 0.0
    """Wall-clock time the image entered its phase (for the retention policy)."""

    @property
    def in_staging(self) -> int:
        """Tiles of this image taking staging space (committed, reassembling, sealing)."""
        if self.image.phase not in HOLDS_STAGED_TILES:
            return 0
        return len(self.staged) + len(self.assemblies) + len(self.sealing)

    def close_digest(self, tile: TileKey) -> bytes | None:
        if self.close is None:
            return None
        if self.close_digests is None:
            self.close_digests = {d.tile: bytes.fromhex(d.digest) for d in self.close.digests}
        return self.close_digests.get(tile)

    @classmethod
    def loaded(cls, stored: StoredImage, now: float) -> ImageBook:
        assert stored.manifest is not None
        m, close = stored.manifest, stored.close
        staged = dict(stored.tiles)
        if close is not None:  # staged tiles its close left out were dropped at the close
            listed = {d.tile for d in close.digests}
            staged = {k: v for k, v in staged.items() if k in listed}
        image = Image(
            stored.key,
            stored.phase,
            manifest_id(m),
            m.tile_count if close is None else close.tile_count,
            committed=len(staged),
            closed=close is not None,
            close_shape=None if close is None else close.shape(),
            locations=tuple(stored.locations.items()),
            reason=stored.reason,
            detail=stored.detail,
            last_seen=now,
            digests=tuple(stored.digests.items()),
        )
        return cls(
            image, m, close, staged, manifest_size=len(m.to_bytes()), phase_since=stored.updated
        )


def finished_image(stored: StoredImage) -> Image:
    """A finished image as the lifecycle needs it (no tiles, no manifest kept)."""
    m, close = stored.manifest, stored.close
    count = close.tile_count if close else m.tile_count if m else 0
    return Image(
        stored.key,
        stored.phase,
        manifest_id(m) if m else None,
        count,
        committed=count if stored.phase is Phase.COMPLETE else 0,
        closed=close is not None or stored.phase is Phase.COMPLETE,
        close_shape=close.shape() if close else None,
        locations=tuple(stored.locations.items()),
        reason=stored.reason,
        detail=stored.detail,
        last_seen=stored.updated,
        digests=tuple(stored.digests.items()),
    )


@dataclass
class Stats:
    messages: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    tiles_committed: int = 0
    unanswered: int = 0
    """Refusals not answered because the device sent too many bad messages at once."""
    last_error: str | None = None
    ledger_trouble: str | None = None
    backends: dict[str, str] = field(default_factory=dict)
    store_buckets: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    store_sums: dict[tuple[str, str], float] = field(default_factory=dict)
    stored_bytes: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    """Images that failed, by reason, since start."""
    retention_removed: Counter[str] = field(default_factory=Counter)
    """Images whose staged tiles the retention policy removed, by the phase they were in."""
    staging_free_bytes: int | None = None
    disk_pressure: str = "none"

    def observe_store(self, backend: str, outcome: str, seconds: float, nbytes: int) -> None:
        buckets = self.store_buckets.setdefault((backend, outcome), [0] * (len(STORE_BUCKETS) + 1))
        for n, bound in enumerate((*STORE_BUCKETS, float("inf"))):
            if seconds <= bound:
                buckets[n] += 1
        self.store_sums[(backend, outcome)] = self.store_sums.get((backend, outcome), 0.0) + seconds
        if outcome == "ok":
            self.stored_bytes[backend] += nbytes


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """What the core last published; every mapping is a read-only copy."""

    messages: Mapping[str, int] = field(default_factory=_empty)
    rejections: Mapping[str, int] = field(default_factory=_empty)
    tiles_committed: int = 0
    images_in_progress: int = 0
    staging_bytes: int = 0
    backends: Mapping[str, str] = field(default_factory=_empty)
    last_error: str | None = None
    store_buckets: Mapping[tuple[str, str], tuple[int, ...]] = field(default_factory=_empty)
    store_sums: Mapping[tuple[str, str], float] = field(default_factory=_empty)
    stored_bytes: Mapping[str, int] = field(default_factory=_empty)
    storing: int = 0
    images_failed: int = 0
    unresolved: Mapping[str, int] = field(default_factory=_empty)
    """Failed images still staged, by reason."""
    failed_total: Mapping[str, int] = field(default_factory=_empty)
    waiting: Mapping[str, int] = field(default_factory=_empty)
    attention: tuple[HeldImage, ...] = ()
    staging_free_bytes: int | None = None
    disk_pressure: str = "none"
    retention_removed: Mapping[str, int] = field(default_factory=_empty)


class CoreState:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.images: dict[ImageKey, ImageBook] = {}
        self.finished: OrderedDict[ImageKey, Image] = OrderedDict()
        self.devices: dict[str, DeviceBook] = {}
        self.by_device: dict[str, set[ImageKey]] = {}
        self.io: Counter[ImageKey] = Counter()
        """Staging jobs in flight per image."""
        self.remove_when_idle: set[ImageKey] = set()
        self.absent: OrderedDict[ImageKey, None] = OrderedDict()
        """Keys the ledger just said it does not know (while their parked messages replay)."""
        self.stats = Stats()

    def device(self, device: str) -> DeviceBook:
        book = self.devices.get(device)
        if book is None:
            book = self.devices[device] = DeviceBook.new(self.limits)
        return book

    def hold(self, book: ImageBook) -> None:
        key = book.image.key
        self.images[key] = book
        self.by_device.setdefault(key.device, set()).add(key)
        self.finished.pop(key, None)
        self.absent.pop(key, None)

    def let_go(self, key: ImageKey) -> None:
        book = self.images.pop(key, None)
        self.by_device.get(key.device, set()).discard(key)
        if book is not None:
            self.remember(book.image)

    def remember(self, image: Image) -> None:
        self.finished[image.key] = image
        self.finished.move_to_end(image.key)
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def books_of(self, device: str) -> Iterator[ImageBook]:
        for key in self.by_device.get(device, ()):
            yield self.images[key]

    # -- accounting, computed from the books (so it cannot drift) ------------------------------

    def staged_bytes(self, device: str) -> int:
        return sum(b.in_staging * b.manifest.tile_bytes for b in self.books_of(device))

    def partial_tiles(self, device: str) -> int:
        return sum(len(b.assemblies) + len(b.sealing) for b in self.books_of(device))

    def receiving(self, device: str) -> list[ImageBook]:
        return [b for b in self.books_of(device) if b.image.phase is Phase.RECEIVING]

    def manifest_bytes(self, device: str) -> int:
        return sum(b.manifest_size for b in self.books_of(device))

    def snapshot(self) -> Snapshot:
        s = self.stats
        books = list(self.images.values())
        progress = sum(1 for b in books if b.image.phase in (Phase.RECEIVING, Phase.STORING))
        staged = sum(b.in_staging * b.manifest.tile_bytes for b in books)
        storing = sum(1 for b in books if b.image.phase is Phase.STORING)
        failed = [b for b in books if b.image.phase is Phase.FAILED]
        waiting: Counter[str] = Counter()
        for b in books:
            if b.image.delayed and b.image.phase in (Phase.RECEIVING, Phase.STORING):
                waiting[_named(b.image.delayed, s.backends)] += 1
        return Snapshot(
            MappingProxyType(dict(s.messages)),
            MappingProxyType(dict(s.rejections)),
            s.tiles_committed,
            progress,
            staged,
            MappingProxyType(_health(s.backends, failed)),
            s.ledger_trouble or s.last_error,
            MappingProxyType({k: tuple(v) for k, v in s.store_buckets.items()}),
            MappingProxyType(dict(s.store_sums)),
            MappingProxyType(dict(s.stored_bytes)),
            storing,
            len(failed),
            MappingProxyType(Counter(str(b.image.reason) for b in failed)),
            MappingProxyType(dict(s.failed)),
            MappingProxyType({k: v for k, v in waiting.items() if k in s.backends}),
            _attention(books),
            s.staging_free_bytes,
            s.disk_pressure,
            MappingProxyType(dict(s.retention_removed)),
        )


def _named(detail: str, backends: Mapping[str, str]) -> str:
    """The backend a lifecycle detail names (`"<backend>: <why>"`, see `lifecycle.step`)."""
    name = detail.split(": ", 1)[0]
    return name if name in backends else ""


def _health(backends: Mapping[str, str], failed: list[ImageBook]) -> dict[str, str]:
    """A backend is not healthy while images it refused stay failed, whatever its last write
    said: a permanent refusal must keep the alert on until an admin resolved it."""
    health = dict(backends)
    refused: Counter[str] = Counter()
    last: dict[str, str] = {}
    for book in failed:
        name = _named(book.image.detail or "", backends)
        if name:
            refused[name] += 1
            last[name] = (book.image.detail or "").split(": ", 1)[-1]
    for name, count in refused.items():
        if health[name] == "ok":
            health[name] = f"{count} failed image(s) not resolved; last: {last[name]}"
    return health


def _attention(books: list[ImageBook]) -> tuple[HeldImage, ...]:
    held = [
        b
        for b in books
        if b.image.phase is Phase.FAILED or (b.image.phase is Phase.EXPIRED and b.staged)
    ]
    held.sort(key=lambda b: b.image.last_seen, reverse=True)
    out = []
    for b in held[:ATTENTION_SHOWN]:
        image, ident = b.image, str(b.image.key)
        command = (
            f"server-ingest images retry {ident}"
            if image.phase is Phase.FAILED
            else f"server-ingest images discard {ident}"
        )
        out.append(
            HeldImage(
                device=image.key.device,
                image_id=image.key.image_id,
                image_name=b.manifest.image_name,
                phase=image.phase,
                reason=image.reason.value if image.reason else None,
                detail=image.detail,
                staged_bytes=b.in_staging * b.manifest.tile_bytes,
                command=command,
            )
        )
    return tuple(out)

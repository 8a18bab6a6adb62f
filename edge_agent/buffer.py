"""The durable disk buffer: every frame is on disk before `write_frame` returns, and leaves
only when the server has committed it.

Layout under `spool_dir`::

    queue/                     persist-queue SQLiteAckQueue: the publish order (small records)
    images/<image_id>/
        open.json              the image's open manifest
        accepted.log           "<tile slug> <digest>" per accepted tile (resume, close digests)
        close.json             written by finalize
        tiles/<slug>.tile      raw little-endian pixels of a tile not yet committed
    rejected/<image_id>/       tiles the server refused for good, kept for a human to look at

Bulk bytes never go into SQLite rows (persist-queue rewrites rows on get/ack, which costs
~20 MB/s); each tile is one fsynced file and one small queue record. A queue record is added
only after its file is durable, so a crash leaves at worst a file without a record, which the
next `add_tile` of the same tile overwrites.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import persistqueue
from persistqueue.serializers import json as json_serializer

from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.framing import tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest, TileDigest, decode_open
from tilebridge_runtime.durable import atomic_write, disk_errors, fsync_dir

ItemKind = Literal["open", "tile", "close"]


@dataclass(frozen=True)
class Item:
    """One queue record: something to publish."""

    pqid: int
    kind: ItemKind
    image_id: UUID
    key: TileKey | None
    nbytes: int
    enqueued_at: float
    digest: bytes | None = None
    """A tile's xxh3-128, computed once when it was buffered."""


@dataclass(frozen=True)
class BufferStats:
    tiles: int
    bytes: int
    images: int
    oldest_pending_age_s: float | None
    disk_free_bytes: int


class DiskBuffer:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.rejected_dir = self.root / "rejected"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._queue = persistqueue.SQLiteAckQueue(
            str(self.root / "queue"),
            multithreading=True,
            auto_resume=True,
            serializer=json_serializer,
        )
        self._lock = threading.Lock()
        self._accepted: dict[UUID, dict[TileKey, str]] = {}
        self._manifests: dict[UUID, OpenManifest] = {}
        self._tiles, self._bytes = self._scan_pending()

    # -- acquisition side -------------------------------------------------------------------

    def add_open(self, manifest: OpenManifest) -> bool:
        """Record a new image; False if it is already known (a resumed acquisition)."""
        path = self._image_dir(manifest.image_id) / "open.json"
        if path.exists():
            if decode_open(path.read_bytes()) != manifest:
                raise PermanentError(f"image {manifest.image_id} was opened with another manifest")
            return False
        self._check_space(64 * 1024)
        atomic_write(path, lambda tmp: _write(tmp, manifest.to_bytes()))
        self._put("open", manifest.image_id)
        return True

    def add_tile(self, image_id: UUID, key: TileKey, data: bytes | memoryview) -> bool:
        """Make a tile durable and queue it; False if this tile was already accepted."""
        manifest = self.manifest(image_id)
        if not manifest.has_tile(key):
            raise PermanentError(f"tile {tuple(key)} is not part of image {image_id}")
        if len(data) != manifest.tile_bytes:
            raise PermanentError(
                f"tile {tuple(key)} has {len(data)} bytes, expected {manifest.tile_bytes}"
            )
        accepted = self._accepted_tiles(image_id)
        if key in accepted:
            return False
        if (self._image_dir(image_id) / "close.json").exists():
            raise PermanentError(f"image {image_id} is finalized; tile {tuple(key)} came too late")
        self._check_space(len(data))
        digest = tile_digest(data).hex()
        tiles_dir = self._image_dir(image_id) / "tiles"
        path = tiles_dir / f"{key.slug()}.tile"
        with disk_errors(f"buffering tile {tuple(key)}"):
            tiles_dir.mkdir(exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            fsync_dir(tiles_dir)
            self._put("tile", image_id, key, len(data), digest)
            with open(self._image_dir(image_id) / "accepted.log", "a") as log:
                log.write(f"{key.slug()} {digest}\n")
        with self._lock:
            accepted[key] = digest
            self._tiles += 1
            self._bytes += len(data)
        return True

    def add_close(self, image_id: UUID) -> CloseManifest:
        """Queue the close manifest; every tile of the image must have been accepted."""
        manifest = self.manifest(image_id)
        accepted = self._accepted_tiles(image_id)
        missing = [k for k in manifest.tile_keys() if k not in accepted]
        if missing:
            raise PermanentError(
                f"image {image_id} cannot be finalized: {len(missing)} tiles never written "
                f"(first: {tuple(missing[0])})"
            )
        path = self._image_dir(image_id) / "close.json"
        close = CloseManifest(
            image_id=image_id,
            tile_count=manifest.tile_count,
            digests=tuple(TileDigest(tile=k, digest=accepted[k]) for k in manifest.tile_keys()),
        )
        if not path.exists():
            atomic_write(path, lambda tmp: _write(tmp, close.to_bytes()))
            self._put("close", image_id)
        return close

    # -- publisher side ---------------------------------------------------------------------

    def next_item(self, timeout: float) -> Item | None:
        try:
            raw = self._queue.get(block=True, timeout=timeout, raw=True)
        except persistqueue.Empty:
            return None
        data: dict[str, Any] = raw["data"]
        key = TileKey(*data["key"]) if data.get("key") else None
        digest = bytes.fromhex(data["digest"]) if data.get("digest") else None
        return Item(
            raw["pqid"],
            data["kind"],
            UUID(data["image"]),
            key,
            data.get("n", 0),
            raw["timestamp"],
            digest,
        )

    def manifest(self, image_id: UUID) -> OpenManifest:
        """The image's open manifest (read from disk once, then from memory: every frame
        needs it)."""
        with self._lock:
            cached = self._manifests.get(image_id)
        if cached is not None:
            return cached
        path = self._image_dir(image_id) / "open.json"
        try:
            manifest = decode_open(path.read_bytes())
        except FileNotFoundError:
            refusal = self.refusal(image_id)
            if refusal:
                raise PermanentError(
                    f"image {image_id} was refused by the server: {refusal}"
                ) from None
            raise PermanentError(f"image {image_id} was never opened on this device") from None
        with self._lock:
            self._manifests[image_id] = manifest
        return manifest

    def message(self, item: Item) -> bytes:
        """The JSON payload of an open/close item."""
        return (self._image_dir(item.image_id) / f"{item.kind}.json").read_bytes()

    def read_tile(self, image_id: UUID, key: TileKey) -> bytes:
        return (self._image_dir(image_id) / "tiles" / f"{key.slug()}.tile").read_bytes()

    def is_open(self, image_id: UUID) -> bool:
        return (self._image_dir(image_id) / "open.json").exists()

    def pending_tiles(self, image_id: UUID) -> int:
        """Tiles of the image still waiting for their `committed` ack."""
        return sum(1 for _ in (self._image_dir(image_id) / "tiles").glob("*.tile"))

    def is_closed(self, image_id: UUID) -> bool:
        return (self._image_dir(image_id) / "close.json").exists()

    def open_payload(self, image_id: UUID) -> bytes:
        return (self._image_dir(image_id) / "open.json").read_bytes()

    def done(self, item: Item) -> None:
        """The server has what `item` carried: forget it.

        The file goes before the record: a crash in between leaves a record without a file,
        which the publisher drops when it finds the file gone.
        """
        if item.kind == "tile" and item.key is not None:
            path = self._image_dir(item.image_id) / "tiles" / f"{item.key.slug()}.tile"
            if path.exists():
                path.unlink()
                with self._lock:
                    self._tiles -= 1
                    self._bytes -= item.nbytes
        self._queue.ack(id=item.pqid)

    def done_record(self, item: Item) -> None:
        """Drop a queue record whose data is gone or is being sent under another record."""
        self._queue.ack(id=item.pqid)

    def forget_image(self, image_id: UUID) -> None:
        """The image is complete on the server: drop its directory."""
        with self._lock:
            self._accepted.pop(image_id, None)
            self._manifests.pop(image_id, None)
        shutil.rmtree(self._image_dir(image_id), ignore_errors=True)

    def set_aside(self, item: Item, reason: str) -> None:
        """The server refused `item` for good: move its data aside and stop sending it."""
        target = self.rejected_dir / str(item.image_id)
        target.mkdir(parents=True, exist_ok=True)
        if item.kind == "tile" and item.key is not None:
            source = self._image_dir(item.image_id) / "tiles" / f"{item.key.slug()}.tile"
            if source.exists():
                os.replace(source, target / source.name)
                with self._lock:
                    self._tiles -= 1
                    self._bytes -= item.nbytes
        with open(target / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} {item.kind} {item.key and item.key.slug()} {reason}\n")
        self._queue.ack(id=item.pqid)

    def set_aside_image(self, image_id: UUID, reason: str) -> int:
        """The server refused the whole image: move it aside; its queue records are dropped
        as the publisher meets them (their files are gone). Returns the tiles set aside."""
        source = self._image_dir(image_id)
        if not source.exists():
            return 0
        tiles = list(source.glob("tiles/*.tile"))
        nbytes = sum(t.stat().st_size for t in tiles)
        target = self.rejected_dir / str(image_id)
        target.mkdir(parents=True, exist_ok=True)
        os.replace(source, target / "image")
        with open(target / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} image {reason}\n")
        with self._lock:
            self._accepted.pop(image_id, None)
            self._manifests.pop(image_id, None)
            self._tiles -= len(tiles)
            self._bytes -= nbytes
        return len(tiles)

    def refusal(self, image_id: UUID) -> str | None:
        """Why the server refused this image, if it did."""
        log = self.rejected_dir / str(image_id) / "reasons.log"
        return log.read_text().splitlines()[-1].split(" ", 2)[-1] if log.exists() else None

    def compact(self) -> None:
        """Drop acked queue rows (persist-queue keeps them until asked)."""
        self._queue.clear_acked_data(max_delete=10000, keep_latest=0)

    def stats(self) -> BufferStats:
        with self._lock:
            tiles, nbytes = self._tiles, self._bytes
        images = sum(1 for _ in self.images_dir.iterdir())
        return BufferStats(tiles, nbytes, images, self._oldest_age(), self._free_bytes())

    def close(self) -> None:
        self._queue.close()

    # -- internals --------------------------------------------------------------------------

    def _image_dir(self, image_id: UUID) -> Path:
        return self.images_dir / str(image_id)

    def _put(
        self,
        kind: ItemKind,
        image_id: UUID,
        key: TileKey | None = None,
        n: int = 0,
        digest: str | None = None,
    ) -> None:
        record: dict[str, Any] = {"kind": kind, "image": str(image_id), "n": n}
        if key is not None:
            record["key"] = list(key)
        if digest is not None:
            record["digest"] = digest
        with disk_errors("queueing"):
            try:
                self._queue.put(record)
            except sqlite3.OperationalError as exc:
                raise TransientError(f"disk buffer queue: {exc}") from exc

    def _accepted_tiles(self, image_id: UUID) -> dict[TileKey, str]:
        with self._lock:
            cached = self._accepted.get(image_id)
            if cached is not None:
                return cached
            accepted: dict[TileKey, str] = {}
            log = self._image_dir(image_id) / "accepted.log"
            if log.exists():
                for line in log.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2:  # a torn last line (crash mid-append) is ignored
                        accepted[TileKey.from_slug(parts[0])] = parts[1]
            self._accepted[image_id] = accepted
            return accepted

    def _scan_pending(self) -> tuple[int, int]:
        tiles = nbytes = 0
        for tile in self.images_dir.glob("*/tiles/*.tile"):
            tiles += 1
            nbytes += tile.stat().st_size
        return tiles, nbytes

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _check_space(self, nbytes: int) -> None:
        free = self._free_bytes()
        if free - nbytes < self.min_free_bytes:
            raise TransientError(
                f"disk buffer full: {free} bytes free, keeping {self.min_free_bytes} in reserve"
            )

    def _oldest_age(self) -> float | None:
        # persist-queue has no peek; its table is `ack_queue_default` with status < 5 pending.
        db = self.root / "queue" / "data.db"
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
                row = conn.execute(
                    "SELECT MIN(timestamp) FROM ack_queue_default WHERE status < 5"
                ).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None or row[0] is None else max(0.0, time.time() - row[0])


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)

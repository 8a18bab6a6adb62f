"""The durable spool: every accepted frame, every experiment's state, and what to publish.

Everything the edge knows about an image lives here, so it survives `kill -9` between any
two calls and answers the same after a restart:

    spool.sqlite         images (the manifest, the experiment's stored spec, lifecycle,
                         server state), tiles (digest, PlaneMeta, pending/committed/...),
                         queue (what the publisher sends, in order). WAL, synchronous=FULL.
    tiles/<image_id>/<slug>.tile   raw little-endian pixels, held until the server
                         committed them and (for experiments with local targets) until
                         those targets finished
    rejected/<image_id>/ tiles the server refused for good, kept for a human to look at

A frame is accepted in one order: its file is written and fdatasynced, then its row and its
queue record are committed in one transaction (which also checks the experiment is still
acquiring). A crash in between leaves a file without a row; `recover()` removes it and the
frame was never accepted. Counts (per state, rejected included) are queries of the tiles
table: one source for every status.

Threads: any thread may call; each gets its own SQLite connection (SQLite serializes the
writers; no Python lock is held across I/O). Two calls writing the same tile at once are
serialized by a claim on that tile, so the second answers "already accepted" or 409.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from edge_agent.errors import ConflictError, UnknownExperimentError
from edge_agent.tilefiles import write_durably
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.framing import tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    OpenManifest,
    PlaneMeta,
    TileDigest,
    decode_open,
)
from tilebridge_runtime.durable import disk_errors, fsync_dir

ItemKind = Literal["open", "tile", "close"]
ImageState = Literal["acquiring", "finalizing", "finalized", "aborted"]
ServerState = Literal["off", "sending", "complete", "failed", "refused"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY, manifest BLOB NOT NULL, record TEXT NOT NULL,
    to_server INTEGER NOT NULL, local_hold INTEGER NOT NULL, state TEXT NOT NULL,
    close BLOB, partial INTEGER NOT NULL DEFAULT 0, ended_by TEXT,
    server TEXT NOT NULL, server_detail TEXT, locations TEXT,
    targets TEXT NOT NULL DEFAULT '{}',
    started_at REAL NOT NULL, last_frame_at REAL, done_at REAL
);
CREATE TABLE IF NOT EXISTS tiles (
    image_id TEXT NOT NULL, idx INTEGER NOT NULL, z INTEGER NOT NULL, c INTEGER NOT NULL,
    t INTEGER NOT NULL, digest TEXT NOT NULL, meta TEXT, nbytes INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT, accepted_at REAL NOT NULL,
    PRIMARY KEY (image_id, idx, z, c, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, image_id TEXT NOT NULL,
    idx INTEGER, z INTEGER, c INTEGER, t INTEGER, nbytes INTEGER NOT NULL,
    digest TEXT, enqueued_at REAL NOT NULL
);
"""
"""Tile states: `pending` (not yet committed by the server), `committed`, `rejected` (the
server refused it for good), `local` (an experiment without the server stream)."""


@dataclass(frozen=True)
class Item:
    """One queue record: something to publish."""

    seq: int
    kind: ItemKind
    image_id: UUID
    key: TileKey | None
    nbytes: int
    enqueued_at: float
    digest: bytes | None = None


@dataclass(frozen=True)
class ImageRow:
    image_id: UUID
    manifest: OpenManifest
    record: dict[str, Any]
    """The front door's stored experiment (spec, targets); opaque to the spool."""
    to_server: bool
    local_hold: bool
    state: ImageState
    partial: bool
    ended_by: str | None
    server: ServerState
    server_detail: str | None
    locations: dict[str, str]
    targets: dict[str, dict[str, Any]]
    started_at: float
    last_frame_at: float | None
    done_at: float | None
    close: bytes | None


@dataclass(frozen=True)
class Counts:
    pending: int = 0
    committed: int = 0
    rejected: int = 0
    local: int = 0

    @property
    def accepted(self) -> int:
        return self.pending + self.committed + self.rejected + self.local


@dataclass(frozen=True)
class BufferStats:
    tiles: int
    bytes: int
    images: int
    oldest_pending_age_s: float | None
    disk_free_bytes: int


class Spool:
    def __init__(
        self,
        root: Path,
        min_free_bytes: int = 0,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        """`on_queued`: called after something was queued for the publisher."""
        self.root = Path(root)
        self._on_queued = on_queued
        self.tiles_dir = self.root / "tiles"
        self.rejected_dir = self.root / "rejected"
        self.tiles_dir.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._db_path = self.root / "spool.sqlite"
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the dicts below only, never I/O
        self._manifests: dict[UUID, OpenManifest] = {}
        self._claims: dict[tuple[UUID, TileKey], threading.Event] = {}
        self._queued = threading.Condition()
        self._connections: list[sqlite3.Connection] = []
        with disk_errors("spool database"):
            self._connection().executescript(SCHEMA)

    # -- connections ------------------------------------------------------------------------

    def _connection(self, relaxed: bool = False) -> sqlite3.Connection:
        name = "relaxed" if relaxed else "durable"
        conn: sqlite3.Connection | None = getattr(self._local, name, None)
        if conn is None:
            # check_same_thread off only so that close() may close every thread's connection.
            conn = sqlite3.connect(
                self._db_path, isolation_level=None, timeout=30, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # Relaxed: a commit lost in a crash only means a tile is sent and acked again.
            conn.execute(f"PRAGMA synchronous={'NORMAL' if relaxed else 'FULL'}")
            setattr(self._local, name, conn)
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _db(self, relaxed: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE: writers queue here, not half way through)."""
        conn = self._connection(relaxed)
        with disk_errors("spool database"):
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                _rollback(conn)
                raise TransientError(f"spool database: {exc}") from exc
            except BaseException:
                _rollback(conn)
                raise

    def _read(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self._connection().execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    # -- acquisition side -------------------------------------------------------------------

    def create(
        self, manifest: OpenManifest, record: dict[str, Any], to_server: bool, local_hold: bool
    ) -> bool:
        """Record a new image; False if it exists already (nothing changes then)."""
        self._check_space(64 * 1024)
        now = time.time()
        with self._db() as db:
            if db.execute(
                "SELECT 1 FROM images WHERE image_id = ?", (str(manifest.image_id),)
            ).fetchone():
                return False
            db.execute(
                "INSERT INTO images (image_id, manifest, record, to_server, local_hold, state,"
                " server, started_at) VALUES (?, ?, ?, ?, ?, 'acquiring', ?, ?)",
                (str(manifest.image_id), manifest.to_bytes(), json.dumps(record),
                 int(to_server), int(local_hold), "sending" if to_server else "off", now),
            )  # fmt: skip
            if to_server:
                self._enqueue(db, "open", manifest.image_id)
        self._notify()
        return True

    def image(self, image_id: UUID) -> ImageRow:
        rows = self._read(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE image_id = ?", str(image_id))
        if not rows:
            raise UnknownExperimentError(f"no experiment {image_id} on this agent")
        return self._image_row(rows[0])

    def images(self, *, unfinished: bool = False) -> list[ImageRow]:
        where = "WHERE done_at IS NULL" if unfinished else ""
        rows = self._read(f"SELECT {_IMAGE_COLUMNS} FROM images {where} ORDER BY started_at DESC")
        return [self._image_row(r) for r in rows]

    def manifest(self, image_id: UUID) -> OpenManifest:
        with self._lock:
            cached = self._manifests.get(image_id)
        if cached is not None:
            return cached
        manifest = self.image(image_id).manifest
        with self._lock:
            self._manifests[image_id] = manifest
        return manifest

    def update_record(self, image_id: UUID, record: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE images SET record = ? WHERE image_id = ?",
                (json.dumps(record), str(image_id)),
            )

    def accepted_digest(self, image_id: UUID, key: TileKey) -> tuple[str, float] | None:
        rows = self._read(
            "SELECT digest, accepted_at FROM tiles WHERE image_id = ? AND idx = ? AND z = ?"
            " AND c = ? AND t = ?",
            str(image_id), *key,
        )  # fmt: skip
        return (rows[0][0], rows[0][1]) if rows else None

    def add_tile(
        self,
        image_id: UUID,
        key: TileKey,
        data: bytes | bytearray | memoryview,
        meta: PlaneMeta | None = None,
    ) -> bool:
        """Make a tile durable and queue it; False if it was accepted before with the same
        pixels; ConflictError if with other pixels; PermanentError once the image no longer
        acquires; TransientError if the disk is full (nothing accepted then)."""
        manifest = self.manifest(image_id)
        if not manifest.has_tile(key):
            raise PermanentError(f"tile {tuple(key)} is not part of image {image_id}")
        if len(data) != manifest.tile_bytes:
            raise PermanentError(
                f"tile {tuple(key)} has {len(data)} bytes, expected {manifest.tile_bytes}"
            )
        digest = tile_digest(memoryview(data)).hex()
        with self._claim(image_id, key):
            before = self.accepted_digest(image_id, key)
            if before is not None:
                if before[0] == digest:
                    return False
                raise ConflictError(
                    "pixels",
                    f"tile {tuple(key)} of image {image_id} was accepted with other pixels "
                    f"(digest {before[0]}, these {digest}); the first exposure is kept",
                )
            self._require_acquiring(image_id)
            self._check_space(len(data))
            folder = self.tiles_dir / str(image_id)
            path = folder / f"{key.slug()}.tile"
            with disk_errors(f"buffering tile {tuple(key)}"):
                folder.mkdir(exist_ok=True)
                write_durably(path, data)
                fsync_dir(folder)
            try:
                self._commit_tile(image_id, key, digest, meta, len(data))
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        self._notify()
        return True

    def _commit_tile(
        self, image_id: UUID, key: TileKey, digest: str, meta: PlaneMeta | None, nbytes: int
    ) -> None:
        now = time.time()
        with self._db() as db:
            row = db.execute(
                "SELECT state, to_server, server, server_detail FROM images WHERE image_id = ?",
                (str(image_id),),
            ).fetchone()
            if row is None or row[0] != "acquiring":
                raise PermanentError(f"image {image_id} is {row and row[0]}; no more frames")
            if row[2] == "refused":
                raise PermanentError(f"the server refused image {image_id}: {row[3]}")
            db.execute(
                "INSERT INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (str(image_id), *key, digest, meta.model_dump_json() if meta else None, nbytes,
                 "pending" if row[1] else "local", now),
            )  # fmt: skip
            if row[1]:
                self._enqueue(db, "tile", image_id, key, nbytes, digest)
            db.execute(
                "UPDATE images SET last_frame_at = ? WHERE image_id = ?", (now, str(image_id))
            )

    def _require_acquiring(self, image_id: UUID) -> None:
        rows = self._read("SELECT state FROM images WHERE image_id = ?", str(image_id))
        state = rows[0][0] if rows else "unknown"
        if state != "acquiring":
            raise PermanentError(f"experiment {image_id} is {state}; no more frames")

    def close_image(
        self, image_id: UUID, *, partial: bool = False, ended_by: str | None = None
    ) -> CloseManifest | None:
        """acquiring -> finalizing, atomically with the close manifest (queued when the image
        streams to the server). Without `partial` every tile must have been accepted. None
        when there is nothing to close (a partial image without a single frame)."""
        manifest = self.manifest(image_id)
        with self._db() as db:
            row = db.execute(
                "SELECT state, to_server, close, local_hold FROM images WHERE image_id = ?",
                (str(image_id),),
            ).fetchone()
            hold = bool(row[3])
            if row[0] != "acquiring":
                return CloseManifest.model_validate_json(row[2]) if row[2] else None
            tiles = {
                TileKey(*r[:4]): (r[4], r[5])
                for r in db.execute(
                    "SELECT idx, z, c, t, digest, meta FROM tiles WHERE image_id = ?",
                    (str(image_id),),
                )
            }
            keys = [k for k in manifest.tile_keys() if k in tiles]
            missing = manifest.tile_count - len(keys)
            if missing and not partial:
                first = next(k for k in manifest.tile_keys() if k not in tiles)
                raise PermanentError(
                    f"cannot finalize {manifest.experiment}: {missing} of {manifest.tile_count}"
                    f" frames not written (first: tile_index={first.index} z_index={first.z} "
                    f"channel_index={first.c} time_index={first.t}); finalize with partial "
                    "to close it with the frames it has"
                )
            close = None
            if keys:
                close = CloseManifest(
                    image_id=image_id,
                    tile_count=len(keys),
                    digests=tuple(
                        TileDigest(tile=k, digest=tiles[k][0], meta=_meta(tiles[k][1]))
                        for k in keys
                    ),
                    partial=bool(missing),
                )
            # Local targets still have to finish their files; without any it is done now.
            state = ("finalizing" if hold else "finalized") if close else "aborted"
            db.execute(
                "UPDATE images SET state = ?, close = ?, partial = ?, ended_by = ?"
                " WHERE image_id = ?",
                (state, close.to_bytes() if close else None, int(bool(missing)), ended_by,
                 str(image_id)),
            )  # fmt: skip
            if close is None:  # not a single frame: nothing to keep, nothing more to send
                db.execute(
                    "UPDATE images SET done_at = ?, local_hold = 0 WHERE image_id = ?",
                    (time.time(), str(image_id)),
                )
                db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
            refused = db.execute(
                "SELECT server = 'refused' FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()[0]
            if close is not None and row[1] and not refused:
                self._enqueue(db, "close", image_id)
        self._notify()
        return close

    def set_state(self, image_id: UUID, state: ImageState) -> None:
        with self._db() as db:
            db.execute("UPDATE images SET state = ? WHERE image_id = ?", (state, str(image_id)))

    def set_target(self, image_id: UUID, label: str, progress: dict[str, Any]) -> None:
        """Record a local target's final state (finished / failed), kept across restarts."""
        with self._db() as db:
            (raw,) = db.execute(
                "SELECT targets FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()
            targets = json.loads(raw) | {label: progress}
            db.execute(
                "UPDATE images SET targets = ? WHERE image_id = ?",
                (json.dumps(targets), str(image_id)),
            )

    def abort(self, image_id: UUID, ended_by: str | None = None) -> None:
        """Drop what the Pi holds of the image: unsent tiles and queue records."""
        with self._db() as db:
            db.execute(
                "UPDATE images SET state = 'aborted', ended_by = ?, local_hold = 0,"
                " done_at = COALESCE(done_at, ?) WHERE image_id = ?",
                (ended_by, time.time(), str(image_id)),
            )
            db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
        shutil.rmtree(self.tiles_dir / str(image_id), ignore_errors=True)

    def release_local(self, image_id: UUID) -> None:
        """The local targets are done: tile files the server has no more need of go."""
        with self._db() as db:
            db.execute("UPDATE images SET local_hold = 0 WHERE image_id = ?", (str(image_id),))
            db.execute(
                "UPDATE images SET done_at = ? WHERE image_id = ? AND done_at IS NULL"
                " AND (to_server = 0 OR server IN ('complete', 'failed', 'refused'))",
                (time.time(), str(image_id)),
            )
            gone = db.execute(
                "SELECT idx, z, c, t FROM tiles WHERE image_id = ? AND state != 'pending'",
                (str(image_id),),
            ).fetchall()
        for key in gone:
            self.tile_path(image_id, TileKey(*key)).unlink(missing_ok=True)

    def tile_path(self, image_id: UUID, key: TileKey) -> Path:
        return self.tiles_dir / str(image_id) / f"{key.slug()}.tile"

    def read_tile(self, image_id: UUID, key: TileKey) -> bytes:
        return self.tile_path(image_id, key).read_bytes()

    def accepted_tiles(self, image_id: UUID) -> dict[TileKey, PlaneMeta | None]:
        rows = self._read("SELECT idx, z, c, t, meta FROM tiles WHERE image_id = ?", str(image_id))
        return {TileKey(*r[:4]): _meta(r[4]) for r in rows}

    def counts(self, image_id: UUID) -> Counts:
        rows = self._read(
            "SELECT state, COUNT(*) FROM tiles WHERE image_id = ? GROUP BY state", str(image_id)
        )
        return Counts(**{state: n for state, n in rows})

    # -- publisher side ---------------------------------------------------------------------

    def next_item(self, after: int, timeout: float) -> Item | None:
        """The first queue record after `after` (a seq); waits up to `timeout` for one."""
        deadline = time.monotonic() + timeout
        while True:
            rows = (
                self._connection(relaxed=True)
                .execute(
                    "SELECT seq, kind, image_id, idx, z, c, t, nbytes, digest, enqueued_at"
                    " FROM queue WHERE seq > ? ORDER BY seq LIMIT 1",
                    (after,),
                )
                .fetchall()
            )
            if rows:
                seq, kind, image, idx, z, c, t, nbytes, digest, at = rows[0]
                key = TileKey(idx, z, c, t) if kind == "tile" else None
                return Item(seq, kind, UUID(image), key, nbytes, at,
                            bytes.fromhex(digest) if digest else None)  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._queued:
                self._queued.wait(remaining)

    def payload(self, item: Item) -> bytes:
        """The JSON of an open / close record."""
        column = "manifest" if item.kind == "open" else "close"
        rows = self._read(f"SELECT {column} FROM images WHERE image_id = ?", str(item.image_id))
        if not rows or rows[0][0] is None:
            raise FileNotFoundError(f"{item.kind} of {item.image_id}")
        return bytes(rows[0][0])

    def drop(self, item: Item) -> None:
        with self._db(relaxed=True) as db:
            db.execute("DELETE FROM queue WHERE seq = ?", (item.seq,))

    def tile_committed(self, image_id: UUID, key: TileKey) -> bool:
        """The server has the tile: forget its bytes (unless local targets still need them).
        False if it was not pending (a repeated ack)."""
        where = "image_id = ? AND idx = ? AND z = ? AND c = ? AND t = ?"
        with self._db(relaxed=True) as db:
            changed = db.execute(
                f"UPDATE tiles SET state = 'committed' WHERE {where} AND state = 'pending'",
                (str(image_id), *key),
            ).rowcount
            db.execute(f"DELETE FROM queue WHERE kind = 'tile' AND {where}", (str(image_id), *key))
            hold = db.execute(
                "SELECT local_hold FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()
        if changed and not (hold and hold[0]):
            self.tile_path(image_id, key).unlink(missing_ok=True)
        return bool(changed)

    def tile_rejected(self, item: Item, reason: str) -> None:
        assert item.key is not None
        with self._db(relaxed=True) as db:
            db.execute(
                "UPDATE tiles SET state = 'rejected', reason = ? WHERE image_id = ? AND idx = ?"
                " AND z = ? AND c = ? AND t = ?",
                (reason, str(item.image_id), *item.key),
            )
            db.execute("DELETE FROM queue WHERE seq = ?", (item.seq,))
        source = self.tile_path(item.image_id, item.key)
        target = self.rejected_dir / str(item.image_id)
        target.mkdir(parents=True, exist_ok=True)
        if source.exists():
            os.replace(source, target / source.name)
        with open(target / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} tile {item.key.slug()} {reason}\n")

    def image_refused(self, image_id: UUID, reason: str) -> int:
        """The server refused the whole image: set it aside; returns the tiles refused."""
        with self._db(relaxed=True) as db:
            refused = db.execute(
                "UPDATE tiles SET state = 'rejected', reason = ? WHERE image_id = ?"
                " AND state = 'pending'",
                (reason, str(image_id)),
            ).rowcount
            db.execute(
                "UPDATE images SET server = 'refused', server_detail = ?,"
                " done_at = COALESCE(done_at, ?) WHERE image_id = ?",
                (reason, time.time(), str(image_id)),
            )
            db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
        source = self.tiles_dir / str(image_id)
        target = self.rejected_dir / str(image_id)
        target.mkdir(parents=True, exist_ok=True)
        if source.exists():
            os.replace(source, target / "tiles")
        with open(target / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} image {reason}\n")
        return int(refused)

    def image_done(
        self, image_id: UUID, complete: bool, detail: str | None, locations: dict[str, str]
    ) -> None:
        """The server answered the image (complete, or failed for good)."""
        with self._db(relaxed=True) as db:
            db.execute(
                "UPDATE images SET server = ?, server_detail = ?, locations = ?,"
                " done_at = CASE WHEN local_hold = 0 THEN COALESCE(done_at, ?) END"
                " WHERE image_id = ?",
                ("complete" if complete else "failed", detail, json.dumps(locations),
                 time.time(), str(image_id)),
            )  # fmt: skip
            db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
            hold = db.execute(
                "SELECT local_hold FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()
        if hold is not None and not hold[0]:
            shutil.rmtree(self.tiles_dir / str(image_id), ignore_errors=True)

    # -- maintenance ------------------------------------------------------------------------

    def recover(self) -> int:
        """At start-up: remove tile files no committed row owns (a crash between the file
        and its row). Returns how many."""
        known = {
            (r[0], TileKey(*r[1:]).slug())
            for r in self._read("SELECT image_id, idx, z, c, t FROM tiles")
        }
        stray = 0
        for path in self.tiles_dir.glob("*/*.tile"):
            if (path.parent.name, path.stem) not in known:
                path.unlink(missing_ok=True)
                stray += 1
        return stray

    def purge(self, retention_s: float) -> int:
        """Forget images done longer than `retention_s` ago; returns how many."""
        cutoff = time.time() - retention_s
        with self._db(relaxed=True) as db:
            old = [r[0] for r in db.execute(
                "SELECT image_id FROM images WHERE done_at IS NOT NULL AND done_at < ?", (cutoff,)
            )]  # fmt: skip
            for image_id in old:
                db.execute("DELETE FROM tiles WHERE image_id = ?", (image_id,))
                db.execute("DELETE FROM images WHERE image_id = ?", (image_id,))
        with self._lock:
            for image_id in old:
                self._manifests.pop(UUID(image_id), None)
        for image_id in old:
            shutil.rmtree(self.tiles_dir / image_id, ignore_errors=True)
        return len(old)

    def stats(self) -> BufferStats:
        (tiles, nbytes), = self._read(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM tiles WHERE state = 'pending'"
        )  # fmt: skip
        ((images,),) = self._read("SELECT COUNT(*) FROM images WHERE done_at IS NULL")
        ((oldest,),) = self._read("SELECT MIN(enqueued_at) FROM queue")
        age = None if oldest is None else max(0.0, time.time() - oldest)
        return BufferStats(tiles, nbytes, images, age, self._free_bytes())

    # -- internals --------------------------------------------------------------------------

    @contextmanager
    def _claim(self, image_id: UUID, key: TileKey) -> Iterator[None]:
        """Only one call writes a given tile at a time; a second one waits for the first."""
        while True:
            with self._lock:
                busy = self._claims.get((image_id, key))
                if busy is None:
                    mine = self._claims[(image_id, key)] = threading.Event()
                    break
            busy.wait()
        try:
            yield
        finally:
            with self._lock:
                del self._claims[(image_id, key)]
            mine.set()

    def _enqueue(
        self,
        db: sqlite3.Connection,
        kind: ItemKind,
        image_id: UUID,
        key: TileKey | None = None,
        nbytes: int = 0,
        digest: str | None = None,
    ) -> None:
        idx, z, c, t = key if key is not None else (None, None, None, None)
        db.execute(
            "INSERT INTO queue (kind, image_id, idx, z, c, t, nbytes, digest, enqueued_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, str(image_id), idx, z, c, t, nbytes, digest, time.time()),
        )

    def _notify(self) -> None:
        with self._queued:
            self._queued.notify_all()
        if self._on_queued is not None:
            self._on_queued()

    def _image_row(self, r: tuple[Any, ...]) -> ImageRow:
        return ImageRow(
            image_id=UUID(r[0]), manifest=decode_open(bytes(r[1])), record=json.loads(r[2]),
            to_server=bool(r[3]), local_hold=bool(r[4]), state=r[5], close=r[6],
            partial=bool(r[7]), ended_by=r[8], server=r[9], server_detail=r[10],
            locations=json.loads(r[11]) if r[11] else {}, targets=json.loads(r[12]),
            started_at=r[13], last_frame_at=r[14], done_at=r[15],
        )  # fmt: skip

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _check_space(self, nbytes: int) -> None:
        free = self._free_bytes()
        if free - nbytes < self.min_free_bytes:
            raise TransientError(
                f"spool disk full: {free} bytes free, keeping {self.min_free_bytes} in reserve"
            )


_IMAGE_COLUMNS = (
    "image_id, manifest, record, to_server, local_hold, state, close, partial, ended_by,"
    " server, server_detail, locations, targets, started_at, last_frame_at, done_at"
)


def _meta(raw: str | None) -> PlaneMeta | None:
    return PlaneMeta.model_validate_json(raw) if raw else None


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")

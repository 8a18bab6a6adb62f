"""The spool's storage: its SQLite database, its tile files, and the reads every part
shares (see `edge_agent.spool` for what it keeps and in which order).

Threads: any thread may call; each gets its own SQLite connection (SQLite serializes the
writers; no Python lock is held across I/O). The publisher's updates go through a relaxed
connection (synchronous=NORMAL): a commit lost in a crash only means a tile is sent and
acknowledged again; everything the acquisition is answered on is committed FULL.
"""

from __future__ import annotations

import json
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

from edge_agent.errors import UnknownExperimentError
from tilebridge_protocol.errors import TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    OpenManifest,
    PlaneMeta,
    decode_open,
)
from tilebridge_runtime.durable import disk_errors

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


class SpoolDB:
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

    def accepted_digest(self, image_id: UUID, key: TileKey) -> tuple[str, float] | None:
        rows = self._read(
            "SELECT digest, accepted_at FROM tiles WHERE image_id = ? AND idx = ? AND z = ?"
            " AND c = ? AND t = ?",
            str(image_id), *key,
        )  # fmt: skip
        return (rows[0][0], rows[0][1]) if rows else None

    def tile_path(self, image_id: UUID, key: TileKey) -> Path:
        return self.tiles_dir / str(image_id) / f"{key.slug()}.tile"

    def read_tile(self, image_id: UUID, key: TileKey) -> bytes:
        return self.tile_path(image_id, key).read_bytes()

    def accepted_tiles(self, image_id: UUID) -> dict[TileKey, PlaneMeta | None]:
        rows = self._read("SELECT idx, z, c, t, meta FROM tiles WHERE image_id = ?", str(image_id))
        return {TileKey(*r[:4]): meta_of(r[4]) for r in rows}

    def counts(self, image_id: UUID) -> Counts:
        rows = self._read(
            "SELECT state, COUNT(*) FROM tiles WHERE image_id = ? GROUP BY state", str(image_id)
        )
        return Counts(**{state: n for state, n in rows})

    def stats(self) -> BufferStats:
        (tiles, nbytes), = self._read(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM tiles WHERE state = 'pending'"
        )  # fmt: skip
        ((images,),) = self._read("SELECT COUNT(*) FROM images WHERE done_at IS NULL")
        ((oldest,),) = self._read("SELECT MIN(enqueued_at) FROM queue")
        age = None if oldest is None else max(0.0, time.time() - oldest)
        return BufferStats(tiles, nbytes, images, age, self._free_bytes())

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


def meta_of(raw: str | None) -> PlaneMeta | None:
    return PlaneMeta.model_validate_json(raw) if raw else None


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")

"""The embedded ledger: one SQLite file (WAL, synchronous=FULL), schema versioned.

`PRAGMA user_version` holds the schema version; `MIGRATIONS[n]` takes a database from
version n to n + 1 in one transaction, so a ledger written by any earlier release opens.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any
from uuid import UUID

from server_ingest.ledger.base import Ledger
from server_ingest.ledger.records import (
    HOLDS_STAGED_TILES,
    BackendStored,
    CloseReceived,
    DeadLetter,
    ImageKey,
    ImageOpened,
    ImageRefused,
    PhaseSet,
    Record,
    StoredImage,
    TileStaged,
)
from tilebridge_protocol.errors import TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase

_V1 = """
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY, device TEXT NOT NULL, manifest TEXT, close TEXT,
    phase TEXT NOT NULL, error TEXT, locations TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tiles (
    image_id TEXT NOT NULL, idx INTEGER NOT NULL, z INTEGER NOT NULL, c INTEGER NOT NULL,
    t INTEGER NOT NULL, digest TEXT NOT NULL, nbytes INTEGER NOT NULL,
    PRIMARY KEY (image_id, idx, z, c, t)
);
"""

_V2 = """
ALTER TABLE images RENAME TO images_v1;
ALTER TABLE tiles RENAME TO tiles_v1;
CREATE TABLE images (
    device TEXT NOT NULL, image_id TEXT NOT NULL, phase TEXT NOT NULL,
    manifest TEXT, close TEXT, reason TEXT, detail TEXT,
    created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (device, image_id)
) WITHOUT ROWID;
CREATE INDEX images_by_phase ON images (phase, updated);
CREATE TABLE tiles (
    device TEXT NOT NULL, image_id TEXT NOT NULL, idx INTEGER NOT NULL, z INTEGER NOT NULL,
    c INTEGER NOT NULL, t INTEGER NOT NULL, digest BLOB NOT NULL, nbytes INTEGER NOT NULL,
    PRIMARY KEY (device, image_id, idx, z, c, t)
) WITHOUT ROWID;
CREATE TABLE locations (
    device TEXT NOT NULL, image_id TEXT NOT NULL, backend TEXT NOT NULL,
    location TEXT NOT NULL, PRIMARY KEY (device, image_id, backend)
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, device TEXT NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL
);
"""


def _script(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and a migration is one transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _to_v1(db: sqlite3.Connection) -> None:
    """The schema before versioning (image ids unique across devices)."""
    _script(db, _V1)


def _to_v2(db: sqlite3.Connection) -> None:
    """Images keyed by (device, image_id); reasons in two columns; locations in a table."""
    _script(db, _V2)
    rows = db.execute(
        "SELECT image_id, device, manifest, close, phase, error, locations, "
        "created, updated FROM images_v1"
    ).fetchall()
    for image_id, device, manifest, close, phase, error, locations, created, updated in rows:
        # The one place a "code: detail" string is read: the v1 rows that stored one.
        code, _, detail = (error or "").partition(": ")
        reason = code if code in ReasonCode._value2member_map_ else None
        if error and reason is None:
            reason, detail = ReasonCode.STORAGE_FAILED.value, error
        db.execute(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (device, image_id, phase, manifest, close, reason, detail or None, created, updated),
        )
        for backend, location in json.loads(locations).items():
            db.execute(
                "INSERT INTO locations VALUES (?, ?, ?, ?)", (device, image_id, backend, location)
            )
    tiles = db.execute(
        "SELECT i.device, t.image_id, t.idx, t.z, t.c, t.t, t.digest, t.nbytes "
        "FROM tiles_v1 t JOIN images_v1 i USING (image_id)"
    ).fetchall()
    db.executemany(
        "INSERT INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(*row[:6], bytes.fromhex(row[6]), row[7]) for row in tiles],
    )
    db.execute("DROP TABLE images_v1")
    db.execute("DROP TABLE tiles_v1")


def _to_v3(db: sqlite3.Connection) -> None:
    """Each backend's verified digest next to its location (issue 13)."""
    db.execute("ALTER TABLE locations ADD COLUMN digest TEXT")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_to_v1, _to_v2, _to_v3)
SCHEMA_VERSION = len(MIGRATIONS)

_IMAGE_COLUMNS = "device, image_id, phase, manifest, close, reason, detail, updated"


class SqliteLedger(Ledger):
    """docstring inherited"""

    def __init__(self, path: Path, dead_letters_max: int = 1000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one thread at a time: the ledger writer once running.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self.dead_letters_max = dead_letters_max
        self._migrate()

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        for number in range(version, SCHEMA_VERSION):
            with self._transaction():
                MIGRATIONS[number](self._db)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    # -- writing ------------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> None:
        try:
            with self._transaction():
                for record in records:
                    self._apply(record)
        except sqlite3.OperationalError as exc:  # full disk, I/O error, locked: may pass
            raise TransientError(f"ledger: {exc}") from exc

    def _apply(self, r: Record) -> None:
        x = self._db.execute
        if isinstance(r, TileStaged):
            x(
                "INSERT OR IGNORE INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*_key(r.key), *r.tile, r.digest, r.nbytes),
            )
        elif isinstance(r, ImageOpened):
            x(
                "INSERT INTO images (device, image_id, phase, manifest, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET phase = excluded.phase, "
                "manifest = excluded.manifest, reason = NULL, detail = NULL, "
                "updated = excluded.updated",
                (
                    *_key(r.key),
                    ImagePhase.RECEIVING.value,
                    r.manifest.model_dump_json(),
                    r.at,
                    r.at,
                ),
            )
        elif isinstance(r, ImageRefused):
            x(
                "INSERT INTO images (device, image_id, phase, reason, detail, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET reason = excluded.reason, "
                "detail = excluded.detail, updated = excluded.updated "
                "WHERE images.phase = 'rejected'",
                (*_key(r.key), ImagePhase.REJECTED.value, r.reason.value, r.detail, r.at, r.at),
            )
        elif isinstance(r, CloseReceived):
            x(
                "UPDATE images SET close = ? WHERE device = ? AND image_id = ? AND close IS NULL",
                (r.close.model_dump_json(), *_key(r.key)),
            )
        elif isinstance(r, PhaseSet):
            x(
                "UPDATE images SET phase = ?, reason = ?, detail = ?, updated = ? "
                "WHERE device = ? AND image_id = ?",
                (r.phase.value, r.reason.value if r.reason else None, r.detail, r.at, *_key(r.key)),
            )
        elif isinstance(r, BackendStored):
            x(
                "INSERT OR REPLACE INTO locations VALUES (?, ?, ?, ?, ?)",
                (*_key(r.key), r.backend, r.location, r.digest),
            )
        else:
            x(
                "INSERT INTO dead_letters (at, device, topic, reason, detail, payload, "
                "payload_bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (r.at, r.device, r.topic, r.reason.value, r.detail, r.payload, r.payload_bytes),
            )
            x(
                "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?",
                (self.dead_letters_max,),
            )

    # -- reading ------------------------------------------------------------------------------

    def recover(self, devices: Iterable[str] | None = None) -> list[StoredImage]:
        marks = ",".join("?" * len(HOLDS_STAGED_TILES))
        args: tuple[object, ...] = tuple(p.value for p in HOLDS_STAGED_TILES)
        where = f"phase IN ({marks})"
        if devices is not None:
            wanted = tuple(devices)
            where += f" AND device IN ({','.join('?' * len(wanted))})"
            args += wanted
        rows = self._rows(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE {where} ORDER BY created", args
        )
        return [self._image(row) for row in rows]

    def lookup(self, keys: Iterable[ImageKey]) -> dict[ImageKey, StoredImage]:
        found = {}
        for key in keys:
            rows = self._rows(
                f"SELECT {_IMAGE_COLUMNS} FROM images WHERE device = ? AND image_id = ?", _key(key)
            )
            if rows:
                found[key] = self._image(rows[0])
        return found

    def images(
        self, phases: Iterable[ImagePhase] = (), device: str | None = None, limit: int = 1000
    ) -> list[StoredImage]:
        where: list[str] = []
        args: list[object] = []
        wanted = [p.value for p in phases]
        if wanted:
            where.append(f"phase IN ({','.join('?' * len(wanted))})")
            args += wanted
        if device is not None:
            where.append("device = ?")
            args.append(device)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._rows(
            f"SELECT {_IMAGE_COLUMNS} FROM images {clause} ORDER BY updated DESC LIMIT ?",
            (*args, limit),
        )
        return [self._image(row, tiles=False) for row in rows]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._rows(
            "SELECT id, at, device, topic, reason, detail, payload, payload_bytes "
            "FROM dead_letters ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            DeadLetter(i, at, d, topic, ReasonCode(reason), detail, bytes(p), n)
            for i, at, d, topic, reason, detail, p, n in rows
        ]

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        with closing(self._db.cursor()) as cur:
            return cur.execute(sql, args).fetchall()

    def _image(self, row: tuple[Any, ...], tiles: bool = True) -> StoredImage:
        device, image_id, phase, manifest, close, reason, detail, updated = row
        key = ImageKey(device, UUID(image_id))
        phase = ImagePhase(phase)
        stored = self._rows(
            "SELECT backend, location, digest FROM locations WHERE device = ? AND image_id = ?",
            _key(key),
        )
        locations = {backend: location for backend, location, _ in stored}
        verified = {backend: digest for backend, _, digest in stored if digest is not None}
        digests: dict[TileKey, bytes] = {}
        if tiles and phase in HOLDS_STAGED_TILES:
            digests = {
                TileKey(i, z, c, t): bytes(d)
                for i, z, c, t, d in self._rows(
                    "SELECT idx, z, c, t, digest FROM tiles WHERE device = ? AND image_id = ?",
                    _key(key),
                )
            }
        return StoredImage(
            key,
            phase,
            OpenManifest.model_validate_json(manifest) if manifest else None,
            CloseManifest.model_validate_json(close) if close else None,
            ReasonCode(reason) if reason else None,
            detail,
            updated,
            locations,
            digests,
            verified,
        )


def _key(key: ImageKey) -> tuple[str, str]:
    return key.device, str(key.image_id)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                # A full disk may make SQLite roll back by itself: rolling back again would
                # raise "no transaction is active" instead of the reason.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

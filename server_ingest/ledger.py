"""The ingest's durable memory: which images exist, which tiles are staged, what is stored.

An embedded SQLite database (WAL, synchronous=FULL): a row is on disk before the ack it
justifies is sent, so after a `kill -9` the ingest answers exactly as before.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from uuid import UUID

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id   TEXT PRIMARY KEY,
    device     TEXT NOT NULL,
    manifest   TEXT,
    close      TEXT,
    phase      TEXT NOT NULL,
    error      TEXT,
    locations  TEXT NOT NULL DEFAULT '{}',
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tiles (
    image_id TEXT NOT NULL,
    idx INTEGER NOT NULL, z INTEGER NOT NULL, c INTEGER NOT NULL, t INTEGER NOT NULL,
    digest TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    PRIMARY KEY (image_id, idx, z, c, t)
);
"""


class Phase(StrEnum):
    RECEIVING = "receiving"
    STORING = "storing"
    COMPLETE = "complete"
    FAILED = "failed"
    REJECTED = "rejected"


@dataclass
class ImageRecord:
    image_id: UUID
    device: str
    manifest: OpenManifest | None
    close: CloseManifest | None
    phase: Phase
    error: str | None
    locations: dict[str, str]


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def image(self, image_id: UUID) -> ImageRecord | None:
        with self._lock, closing(self._db.cursor()) as cur:
            row = cur.execute(
                "SELECT image_id, device, manifest, close, phase, error, locations "
                "FROM images WHERE image_id = ?",
                (str(image_id),),
            ).fetchone()
        return _record(row) if row else None

    def images(self, *phases: Phase) -> list[ImageRecord]:
        marks = ",".join("?" * len(phases))
        with self._lock, closing(self._db.cursor()) as cur:
            rows = cur.execute(
                "SELECT image_id, device, manifest, close, phase, error, locations "
                f"FROM images WHERE phase IN ({marks}) ORDER BY created",
                tuple(p.value for p in phases),
            ).fetchall()
        return [_record(r) for r in rows]

    def add_image(self, device: str, manifest: OpenManifest) -> None:
        now = time.time()
        self._write(
            "INSERT INTO images (image_id, device, manifest, phase, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (image_id) DO UPDATE SET "
            "manifest = excluded.manifest, phase = excluded.phase, error = NULL, "
            "updated = excluded.updated WHERE images.manifest IS NULL",
            (str(manifest.image_id), device, manifest.model_dump_json(), Phase.RECEIVING, now, now),
        )

    def reject_image(self, device: str, image_id: UUID, error: str) -> None:
        now = time.time()
        self._write(
            "INSERT OR IGNORE INTO images (image_id, device, phase, error, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (str(image_id), device, Phase.REJECTED, error, now, now),
        )

    def set_close(self, image_id: UUID, close: CloseManifest) -> None:
        self._write(
            "UPDATE images SET close = ?, updated = ? WHERE image_id = ?",
            (close.model_dump_json(), time.time(), str(image_id)),
        )

    def set_phase(
        self,
        image_id: UUID,
        phase: Phase,
        error: str | None = None,
        locations: dict[str, str] | None = None,
    ) -> None:
        self._write(
            "UPDATE images SET phase = ?, error = ?, locations = COALESCE(?, locations), "
            "updated = ? WHERE image_id = ?",
            (
                phase,
                error,
                json.dumps(locations) if locations is not None else None,
                time.time(),
                str(image_id),
            ),
        )

    def add_tile(self, image_id: UUID, key: TileKey, digest: bytes, nbytes: int) -> bool:
        """Record a staged tile; False if it was already recorded."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO tiles (image_id, idx, z, c, t, digest, nbytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(image_id), *key, digest.hex(), nbytes),
            )
            return cur.rowcount == 1

    def tile_digest(self, image_id: UUID, key: TileKey) -> bytes | None:
        with self._lock, closing(self._db.cursor()) as cur:
            row = cur.execute(
                "SELECT digest FROM tiles WHERE image_id = ? AND idx = ? AND z = ? AND c = ? "
                "AND t = ?",
                (str(image_id), *key),
            ).fetchone()
        return bytes.fromhex(row[0]) if row else None

    def tiles(self, image_id: UUID) -> dict[TileKey, bytes]:
        with self._lock, closing(self._db.cursor()) as cur:
            rows = cur.execute(
                "SELECT idx, z, c, t, digest FROM tiles WHERE image_id = ?", (str(image_id),)
            ).fetchall()
        return {TileKey(i, z, c, t): bytes.fromhex(d) for i, z, c, t, d in rows}

    def tile_count(self, image_id: UUID) -> int:
        with self._lock, closing(self._db.cursor()) as cur:
            row = cur.execute(
                "SELECT COUNT(*) FROM tiles WHERE image_id = ?", (str(image_id),)
            ).fetchone()
        return int(row[0])

    def device_staged_bytes(self, device: str) -> int:
        with self._lock, closing(self._db.cursor()) as cur:
            row = cur.execute(
                "SELECT COALESCE(SUM(t.nbytes), 0) FROM tiles t JOIN images i "
                "ON t.image_id = i.image_id WHERE i.device = ? AND i.phase IN (?, ?)",
                (device, Phase.RECEIVING, Phase.STORING),
            ).fetchone()
        return int(row[0])


def _record(row: tuple[str, str, str | None, str | None, str, str | None, str]) -> ImageRecord:
    image_id, device, manifest, close, phase, error, locations = row
    return ImageRecord(
        UUID(image_id),
        device,
        OpenManifest.model_validate_json(manifest) if manifest else None,
        CloseManifest.model_validate_json(close) if close else None,
        Phase(phase),
        error,
        json.loads(locations),
    )

"""The shared ledger: PostgreSQL through psycopg 3 and its connection pool.

Same contract as the SQLite ledger (`base.py`), for several instances at once: each writes
its own devices' images (a device is claimed by one instance, server_ingest/claims.py), so
two instances never write the same image. A batch is one transaction sent as a pipeline
(one round trip per kind of record, not one per record). A lost connection, a restarting
server or an exhausted pool is a `TransientError`: nothing half written, the writer retries
the same batch and the pool reconnects. The schema is versioned (`pg_schema.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from server_ingest.ledger.base import Ledger
from server_ingest.ledger.pg_schema import SCHEMA_VERSION, migrate, schema_version
from server_ingest.ledger.records import (
    HOLDS_STAGED_TILES,
    BackendStored,
    CloseReceived,
    DeadLetter,
    DeadLettered,
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

_IMAGE_COLUMNS = "device, image_id, phase, manifest, close, reason, detail, updated"

_SQL: dict[type[Any], str] = {
    TileStaged: "INSERT INTO tiles VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
    ImageOpened: (
        "INSERT INTO images (device, image_id, phase, manifest, created, updated) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (device, image_id) DO UPDATE SET "
        "phase = excluded.phase, manifest = excluded.manifest, reason = NULL, detail = NULL, "
        "updated = excluded.updated"
    ),
    ImageRefused: (
        "INSERT INTO images (device, image_id, phase, reason, detail, created, updated) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (device, image_id) DO UPDATE SET "
        "reason = excluded.reason, detail = excluded.detail, updated = excluded.updated "
        "WHERE images.phase = 'rejected'"
    ),
    CloseReceived: (
        "UPDATE images SET close = %s WHERE device = %s AND image_id = %s AND close IS NULL"
    ),
    PhaseSet: (
        "UPDATE images SET phase = %s, reason = %s, detail = %s, updated = %s "
        "WHERE device = %s AND image_id = %s"
    ),
    BackendStored: (
        "INSERT INTO locations VALUES (%s, %s, %s, %s, %s) ON CONFLICT "
        "(device, image_id, backend) DO UPDATE SET location = excluded.location, "
        "digest = excluded.digest"
    ),
    DeadLettered: (
        "INSERT INTO dead_letters (at, device, topic, reason, detail, payload, payload_bytes) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)"
    ),
}


def _params(r: Record) -> tuple[Any, ...]:
    if isinstance(r, TileStaged):
        return (*r.key, *r.tile, r.digest, r.nbytes)
    if isinstance(r, ImageOpened):
        phase = ImagePhase.RECEIVING.value
        return (*r.key, phase, r.manifest.model_dump_json(), r.at, r.at)
    if isinstance(r, ImageRefused):
        return (*r.key, ImagePhase.REJECTED.value, r.reason.value, r.detail, r.at, r.at)
    if isinstance(r, CloseReceived):
        return (r.close.model_dump_json(), *r.key)
    if isinstance(r, PhaseSet):
        return (r.phase.value, r.reason.value if r.reason else None, r.detail, r.at, *r.key)
    if isinstance(r, BackendStored):
        return (*r.key, r.backend, r.location, r.digest)
    return (r.at, r.device, r.topic, r.reason.value, r.detail, r.payload, r.payload_bytes)


@contextmanager
def transient(what: str) -> Iterator[None]:
    """Faults that may pass (the server restarting, a lost connection, no free connection)
    as `TransientError`; anything else (a bug, a schema mismatch) propagates."""
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise TransientError(f"{what}: {exc}".strip()) from exc


def open_pool(dsn: str, size: int, timeout_s: float = 10.0) -> ConnectionPool:
    """A pool that connects lazily and reconnects after a server restart (a broken
    connection is discarded when it comes back to the pool)."""
    return ConnectionPool(
        dsn,
        min_size=1,
        max_size=size,
        timeout=timeout_s,
        # Autocommit: every transaction is an explicit `transaction()` block, nothing else.
        kwargs={"connect_timeout": max(1, round(timeout_s)), "autocommit": True},
        open=True,
        name="tilebridge-ledger",
    )


class PostgresLedger(Ledger):
    """docstring inherited"""

    def __init__(self, pool: ConnectionPool, dead_letters_max: int = 1000) -> None:
        self._pool = pool
        self.dead_letters_max = dead_letters_max
        with transient("ledger: migrating the schema"), pool.connection() as db:
            migrate(db)

    @property
    def schema_version(self) -> int:
        with self._pool.connection() as db:
            return schema_version(db)

    def close(self) -> None:
        """The pool belongs to whoever opened it (the composition root)."""

    # -- writing ------------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        with (
            transient("ledger"),
            self._pool.connection() as db,
            db.transaction(),
            db.cursor() as cur,
        ):
            for kind, params in _runs(records):
                cur.executemany(_SQL[kind], params)
            if any(isinstance(r, DeadLettered) for r in records):
                cur.execute(
                    "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - %s",
                    (self.dead_letters_max,),
                )

    # -- reading ------------------------------------------------------------------------------

    def recover(self, devices: Iterable[str] | None = None) -> list[StoredImage]:
        phases: list[object] = [p.value for p in HOLDS_STAGED_TILES]
        args: list[object]
        if devices is None:
            where, args = "phase = ANY(%s)", [phases]
        else:
            where, args = "phase = ANY(%s) AND device = ANY(%s)", [phases, list(devices)]
        return self._images(f"WHERE {where} ORDER BY created", args, tiles=True)

    def lookup(self, keys: Iterable[ImageKey]) -> dict[ImageKey, StoredImage]:
        wanted = list(keys)
        if not wanted:
            return {}
        devices, ids = [k.device for k in wanted], [k.image_id for k in wanted]
        found = self._images(
            "WHERE (device, image_id) IN (SELECT * FROM unnest(%s::text[], %s::uuid[]))",
            [devices, ids],
            tiles=True,
        )
        return {image.key: image for image in found}

    def images(
        self, phases: Iterable[ImagePhase] = (), device: str | None = None, limit: int = 1000
    ) -> list[StoredImage]:
        where: list[str] = []
        args: list[object] = []
        wanted = [p.value for p in phases]
        if wanted:
            where.append("phase = ANY(%s)")
            args.append(wanted)
        if device is not None:
            where.append("device = %s")
            args.append(device)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self._images(f"{clause} ORDER BY updated DESC LIMIT %s", [*args, limit], False)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with transient("ledger"), self._pool.connection() as db:
            rows = db.execute(
                "SELECT id, at, device, topic, reason, detail, payload, payload_bytes "
                "FROM dead_letters ORDER BY id DESC LIMIT %s",
                (limit,),
            ).fetchall()
        return [
            DeadLetter(i, at, d, topic, ReasonCode(reason), detail, bytes(p), n)
            for i, at, d, topic, reason, detail, p, n in rows
        ]

    def _images(self, clause: str, args: list[object], tiles: bool) -> list[StoredImage]:
        """Images, their locations and (if `tiles`, for phases that hold staged tiles) their
        tile digests: three queries whatever the number of images, in one snapshot."""
        with transient("ledger"), self._pool.connection() as db, db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = db.execute(f"SELECT {_IMAGE_COLUMNS} FROM images {clause}", args).fetchall()
            if not rows:
                return []
            keys = ([r[0] for r in rows], [r[1] for r in rows])
            pick = "FROM unnest(%s::text[], %s::uuid[]) AS k(device, image_id)"
            located: dict[tuple[str, UUID], dict[str, str]] = {}
            verified: dict[tuple[str, UUID], dict[str, str]] = {}
            for device, image_id, backend, location, digest in db.execute(
                f"SELECT l.device, l.image_id, l.backend, l.location, l.digest {pick} "
                "JOIN locations l USING (device, image_id)",
                keys,
            ):
                located.setdefault((device, image_id), {})[backend] = location
                if digest is not None:
                    verified.setdefault((device, image_id), {})[backend] = digest
            digests: dict[tuple[str, UUID], dict[TileKey, bytes]] = {}
            holding = [r for r in rows if ImagePhase(r[2]) in HOLDS_STAGED_TILES]
            if tiles and holding:
                keys = ([r[0] for r in holding], [r[1] for r in holding])
                for device, image_id, i, z, c, t, digest in db.execute(
                    f"SELECT s.device, s.image_id, s.idx, s.z, s.c, s.t, s.digest {pick} "
                    "JOIN tiles s USING (device, image_id)",
                    keys,
                ):
                    digests.setdefault((device, image_id), {})[TileKey(i, z, c, t)] = bytes(digest)
        return [
            _stored(
                row,
                located.get((row[0], row[1]), {}),
                digests.get((row[0], row[1]), {}),
                verified.get((row[0], row[1]), {}),
            )
            for row in rows
        ]


def _runs(records: Sequence[Record]) -> Iterator[tuple[type[Any], list[tuple[Any, ...]]]]:
    """Consecutive records of one kind, as one executemany each (their order kept)."""
    kind: type[Any] | None = None
    params: list[tuple[Any, ...]] = []
    for record in records:
        if type(record) is not kind and params:
            assert kind is not None
            yield kind, params
            params = []
        kind = type(record)
        params.append(_params(record))
    if params and kind is not None:
        yield kind, params


def _stored(
    row: tuple[Any, ...],
    locations: dict[str, str],
    tiles: dict[TileKey, bytes],
    verified: dict[str, str],
) -> StoredImage:
    device, image_id, phase, manifest, close, reason, detail, updated = row
    return StoredImage(
        ImageKey(device, image_id),
        ImagePhase(phase),
        OpenManifest.model_validate_json(manifest) if manifest else None,
        CloseManifest.model_validate_json(close) if close else None,
        ReasonCode(reason) if reason else None,
        detail,
        updated,
        locations,
        tiles,
        verified,
    )


__all__ = ["SCHEMA_VERSION", "PostgresLedger", "open_pool", "transient"]

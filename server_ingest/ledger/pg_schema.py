"""The PostgreSQL ledger's schema, versioned: `MIGRATIONS[n]` takes a database from version n
to n + 1, each in one transaction under an advisory lock, so instances starting together
migrate once and a ledger written by any earlier release opens.

The tables mirror the SQLite ledger's (v2), plus `claims` (server_ingest/claims.py).
Timestamps of records are the ingest's epoch seconds, as in SQLite; claim expiries are the
database's own clock (`now()`), the only clock every instance shares.
"""

from __future__ import annotations

from psycopg import Connection

_V1 = """
CREATE TABLE images (
    device TEXT NOT NULL, image_id UUID NOT NULL, phase TEXT NOT NULL,
    manifest TEXT, close TEXT, reason TEXT, detail TEXT,
    created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device, image_id)
);
CREATE INDEX images_by_phase ON images (phase, updated);
CREATE TABLE tiles (
    device TEXT NOT NULL, image_id UUID NOT NULL, idx INTEGER NOT NULL, z INTEGER NOT NULL,
    c INTEGER NOT NULL, t INTEGER NOT NULL, digest BYTEA NOT NULL, nbytes BIGINT NOT NULL,
    PRIMARY KEY (device, image_id, idx, z, c, t)
);
CREATE TABLE locations (
    device TEXT NOT NULL, image_id UUID NOT NULL, backend TEXT NOT NULL,
    location TEXT NOT NULL, PRIMARY KEY (device, image_id, backend)
);
CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, device TEXT NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, payload BYTEA NOT NULL,
    payload_bytes BIGINT NOT NULL
);
CREATE TABLE claims (
    kind TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL,
    expires TIMESTAMPTZ NOT NULL, taken TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX claims_by_holder ON claims (holder);
"""

_V2 = """
ALTER TABLE locations ADD COLUMN digest TEXT;
"""
"""Each backend's verified digest next to its location (issue 13; SQLite's v3)."""

MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK = 0x7462_6C65_6467_6572  # "tbledger": one advisory lock for migrations


def schema_version(db: Connection[tuple[object, ...]]) -> int:
    row = db.execute(
        "SELECT version FROM tilebridge_schema" if _has_version_table(db) else "SELECT 0 AS version"
    ).fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def _has_version_table(db: Connection[tuple[object, ...]]) -> bool:
    row = db.execute("SELECT to_regclass('tilebridge_schema') IS NOT NULL").fetchone()
    return bool(row and row[0])


def migrate(db: Connection[tuple[object, ...]]) -> int:
    """Bring the schema to `SCHEMA_VERSION`; returns the version found before."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS tilebridge_schema (version INTEGER NOT NULL)")
        if db.execute("SELECT count(*) FROM tilebridge_schema").fetchone() == (0,):
            db.execute("INSERT INTO tilebridge_schema VALUES (0)")
    found = schema_version(db)
    for number in range(found, SCHEMA_VERSION):
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            if schema_version(db) != number:  # another instance migrated meanwhile
                continue
            db.execute(MIGRATIONS[number])
            db.execute("UPDATE tilebridge_schema SET version = %s", (number + 1,))
    return found

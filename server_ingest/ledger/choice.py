"""The ledger the settings choose, with its claims: SQLite alone (every claim ours), or
PostgreSQL shared by several instances (one connection pool for ledger and claims)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server_ingest.claims import Claims, LocalClaims
from server_ingest.ledger.base import Ledger
from server_ingest.ledger.sqlite import SqliteLedger
from server_ingest.settings import IngestSettings, PostgresLedgerSettings

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool


@dataclass
class Chosen:
    ledger: Ledger
    claims: Claims
    pool: ConnectionPool | None = field(default=None, repr=False)

    def close(self) -> None:
        self.ledger.close()
        if self.pool is not None:
            self.pool.close()


def open_ledger(settings: IngestSettings) -> Chosen:
    chosen = settings.ledger
    if not isinstance(chosen, PostgresLedgerSettings):
        return Chosen(
            SqliteLedger(settings.ledger_path, settings.dead_letters_max),
            LocalClaims(settings.instance),
        )
    from server_ingest.ledger.pg_claims import PostgresClaims
    from server_ingest.ledger.postgres import PostgresLedger, open_pool

    pool = open_pool(chosen.secret_dsn(), chosen.pool_size, chosen.connect_timeout_s)
    try:
        ledger = PostgresLedger(pool, settings.dead_letters_max)
    except BaseException:
        pool.close()
        raise
    claims = PostgresClaims(pool, settings.instance, settings.cluster.lease_s)
    return Chosen(ledger, claims, pool)

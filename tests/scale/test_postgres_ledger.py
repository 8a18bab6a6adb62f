"""The PostgreSQL ledger: the ledger contract on a real server, its versioned schema, faults
that pass (a restarted server) as `TransientError`, and claims between instances."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.postgres import Postgres
from server_ingest.claims import DEVICE, STORE
from server_ingest.ledger.pg_claims import PostgresClaims
from server_ingest.ledger.pg_schema import SCHEMA_VERSION
from server_ingest.ledger.postgres import PostgresLedger, open_pool
from server_ingest.ledger.records import ImageKey, ImageOpened, PhaseSet
from tests.ingest.ledger_contract import LedgerContract
from tilebridge_protocol.errors import TransientError
from tilebridge_protocol.status import ImagePhase
from tilebridge_storage.testing.manifests import make_manifest


class TestPostgresLedger(LedgerContract):
    @pytest.fixture(autouse=True)
    def _store(self, pg_dsn: str) -> Iterator[None]:
        self.pools: list[ConnectionPool] = []
        self.dsn = pg_dsn
        yield
        for pool in self.pools:
            pool.close()

    def open_ledger(self, dead_letters_max: int = 1000) -> PostgresLedger:
        pool = open_pool(self.dsn, 2)
        self.pools.append(pool)
        return PostgresLedger(pool, dead_letters_max)


def test_the_schema_is_versioned_and_migrated_once(pg_dsn: str) -> None:
    with open_pool(pg_dsn, 2) as pool:
        assert PostgresLedger(pool).schema_version == SCHEMA_VERSION
        PostgresLedger(pool)  # opening again migrates nothing
        with psycopg.connect(pg_dsn) as db:
            assert db.execute("SELECT version FROM tilebridge_schema").fetchall() == [
                (SCHEMA_VERSION,)
            ]


def test_a_restarted_server_is_a_transient_fault_and_the_pool_reconnects(
    postgres: Postgres,
) -> None:
    m = make_manifest()
    key = ImageKey("scope-1", m.image_id)
    with open_pool(postgres.dsn, 2, timeout_s=2) as pool:
        ledger = PostgresLedger(pool)
        ledger.write([ImageOpened(key, m, 1.0)])
        postgres.kill()
        with pytest.raises(TransientError):
            ledger.write([PhaseSet(key, ImagePhase.STORING, 2.0)])
        postgres.start()
        deadline = time.monotonic() + 30
        while True:  # what the ledger writer does: the same batch again until it passes
            try:
                ledger.write([PhaseSet(key, ImagePhase.STORING, 2.0)])
                break
            except TransientError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert ledger.lookup([key])[key].phase is ImagePhase.STORING


def test_a_claim_is_one_instances_until_its_lease_runs_out(pg_dsn: str) -> None:
    with open_pool(pg_dsn, 4) as pool:
        PostgresLedger(pool)
        a, b = PostgresClaims(pool, "ingest-a", 1.0), PostgresClaims(pool, "ingest-b", 1.0)
        first = a.claim(DEVICE, "scope-1")
        assert first.holder == "ingest-a" and first.won and 0 < first.valid_s <= 1.0
        again = a.claim(DEVICE, "scope-1")
        assert again.holder == "ingest-a" and not again.won  # ours already
        theirs = b.claim(DEVICE, "scope-1")
        assert theirs.holder == "ingest-a" and not theirs.won and theirs.valid_s > 0
        assert a.claim(STORE, "scope-1/x/omero").won
        time.sleep(0.6)
        assert a.renew() == {(DEVICE, "scope-1"), (STORE, "scope-1/x/omero")}
        time.sleep(0.6)  # past the first lease, within the renewed one
        assert b.claim(DEVICE, "scope-1").holder == "ingest-a"
        time.sleep(1.1)  # a stopped renewing: its claims are free for the taking
        taken = b.claim(DEVICE, "scope-1")
        assert taken.holder == "ingest-b" and taken.won
        assert a.renew() == {(STORE, "scope-1/x/omero")}  # a learns it lost the device
        a.release(STORE, "scope-1/x/omero")
        assert b.claim(STORE, "scope-1/x/omero").won


def test_orphans_are_devices_with_work_and_no_live_claim(pg_dsn: str) -> None:
    with open_pool(pg_dsn, 2) as pool:
        ledger = PostgresLedger(pool)
        claims = PostgresClaims(pool, "ingest-a", 60.0)
        for device, phase in [
            ("scope-1", ImagePhase.RECEIVING),
            ("scope-2", ImagePhase.STORING),
            ("scope-3", ImagePhase.COMPLETE),
        ]:
            m = make_manifest()
            key = ImageKey(device, m.image_id)
            ledger.write([ImageOpened(key, m, 1.0), PhaseSet(key, phase, 1.0)])
        assert sorted(claims.orphans()) == ["scope-1", "scope-2"]
        claims.claim(DEVICE, "scope-1")
        assert claims.orphans() == ["scope-2"]

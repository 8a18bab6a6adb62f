"""The SQLite ledger: the ledger contract (tests/ingest/ledger_contract.py); a ledger of the
release before the versioned schema opens, its "code: detail" reasons split into columns."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from uuid import uuid4

import pytest

from server_ingest.ledger.records import BackendStored, ImageKey
from server_ingest.ledger.sqlite import _V1, SCHEMA_VERSION, SqliteLedger
from tests.ingest.ledger_contract import LedgerContract
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage.testing.manifests import make_manifest


class TestSqliteLedger(LedgerContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path) -> None:
        self.path = tmp_path / "ledger.sqlite"

    def open_ledger(self, dead_letters_max: int = 1000) -> SqliteLedger:
        return SqliteLedger(self.path, dead_letters_max)


def test_a_ledger_from_before_versioning_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    m, failed_id = make_manifest(), uuid4()
    with closing(sqlite3.connect(path)) as db:
        db.executescript(_V1)
        db.execute(
            "INSERT INTO images VALUES (?, ?, ?, NULL, 'receiving', NULL, "
            '\'{"archive": "/x"}\', 1, 1)',
            (str(m.image_id), "scope-1", m.model_dump_json()),
        )
        db.execute(
            "INSERT INTO images VALUES (?, 'scope-1', NULL, NULL, 'failed', "
            "'storage_failed: omero refused', '{}', 2, 2)",
            (str(failed_id),),
        )
        db.execute(
            "INSERT INTO tiles VALUES (?, 0, 0, 0, 0, ?, 6144)",
            (str(m.image_id), (b"\x01" * 16).hex()),
        )
        db.commit()
    ledger = SqliteLedger(path)
    assert ledger.schema_version == SCHEMA_VERSION
    key, failed = ImageKey("scope-1", m.image_id), ImageKey("scope-1", failed_id)
    found = ledger.lookup([key, failed])
    assert found[key].tiles == {TileKey(0): b"\x01" * 16}
    assert found[key].locations == {"archive": "/x"}
    assert (found[failed].reason, found[failed].detail) == (
        ReasonCode.STORAGE_FAILED,
        "omero refused",
    )
    ledger.close()
    assert SqliteLedger(path).schema_version == SCHEMA_VERSION  # opens again, no migration


def test_a_version_2_ledger_gains_the_digest_column(tmp_path: Path) -> None:
    """Issue 13 added each backend's verified digest: a ledger of issue 12 opens with its
    locations kept and no digest recorded for them."""
    from server_ingest.ledger.sqlite import MIGRATIONS

    path = tmp_path / "ledger.sqlite"
    m = make_manifest()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for migration in MIGRATIONS[:2]:
            migration(db)
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO images VALUES ('scope-1', ?, 'complete', ?, NULL, NULL, NULL, 1, 1)",
            (str(m.image_id), m.model_dump_json()),
        )
        db.execute(
            "INSERT INTO locations VALUES ('scope-1', ?, 'archive', '/x')", (str(m.image_id),)
        )
    ledger = SqliteLedger(path)
    key = ImageKey("scope-1", m.image_id)
    assert ledger.schema_version == SCHEMA_VERSION == 3
    found = ledger.lookup([key])[key]
    assert (found.locations, found.digests) == ({"archive": "/x"}, {})
    ledger.write([BackendStored(key, "archive", "/x", "sha1:" + "00" * 20)])
    assert ledger.lookup([key])[key].digests == {"archive": "sha1:" + "00" * 20}
    ledger.close()

"""The SQLite ledger: typed records in, typed images out; a ledger of the release before the
versioned schema opens, its "code: detail" reasons split into columns."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from uuid import uuid4

from server_ingest.ledger.records import (
    BackendStored,
    CloseReceived,
    DeadLettered,
    ImageKey,
    ImageOpened,
    ImageRefused,
    PhaseSet,
    TileStaged,
)
from server_ingest.ledger.sqlite import _V1, SCHEMA_VERSION, SqliteLedger
from tests.ingest.harness import close_for, tiles_for
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase
from tilebridge_storage.testing.manifests import make_manifest


def test_records_round_trip_and_one_device_never_sees_anothers_image(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite", dead_letters_max=2)
    m = make_manifest()
    mine, theirs = ImageKey("scope-1", m.image_id), ImageKey("scope-2", m.image_id)
    tile = TileKey(0)
    ledger.write(
        [
            ImageOpened(mine, m, 1.0),
            TileStaged(mine, tile, b"d" * 16, 6144),
            TileStaged(mine, tile, b"d" * 16, 6144),  # a retried batch changes nothing
            CloseReceived(mine, close_for(m, tiles_for(m))),
            BackendStored(mine, "archive", "/a.ome.tif"),
            BackendStored(mine, "omero", "omero:Image:4 dataset:1", "sha1:" + "ab" * 20),
            PhaseSet(mine, ImagePhase.FAILED, 2.0, ReasonCode.STORAGE_FAILED, "omero: denied"),
            ImageRefused(theirs, ReasonCode.INVALID_MANIFEST, "junk", 3.0),
            *(
                DeadLettered(4.0, "scope-2", "t", ReasonCode.INTERNAL_ERROR, "bug", b"x", 1)
                for _ in range(3)
            ),
        ]
    )
    found = ledger.lookup([mine, theirs])
    assert found[mine].phase is ImagePhase.FAILED and found[mine].manifest == m
    assert (found[mine].reason, found[mine].detail) == (ReasonCode.STORAGE_FAILED, "omero: denied")
    assert found[mine].tiles == {tile: b"d" * 16}
    assert found[mine].locations == {
        "archive": "/a.ome.tif",
        "omero": "omero:Image:4 dataset:1",
    }
    assert found[mine].digests == {"omero": "sha1:" + "ab" * 20}  # the archive's: unverified
    assert found[theirs].phase is ImagePhase.REJECTED and found[theirs].manifest is None
    assert [i.key for i in ledger.recover()] == [mine]  # its tiles are still staged
    assert len(ledger.dead_letters()) == 2  # bounded
    ledger.close()


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

"""The ledger contract (server_ingest/ledger/base.py) as tests any implementation runs: a
test class subclasses `LedgerContract` and says how to open its ledger (SQLite in
tests/ingest/test_ledger.py, PostgreSQL in tests/scale/test_postgres_ledger.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from uuid import uuid4

from server_ingest.ledger.base import Ledger
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
from tests.ingest.harness import close_for, tiles_for
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase
from tilebridge_storage.testing.manifests import make_manifest


def _letter(n: int) -> DeadLettered:
    return DeadLettered(float(n), "scope-2", "t", ReasonCode.INTERNAL_ERROR, f"bug {n}", b"x", 1)


class LedgerContract(ABC):
    @abstractmethod
    def open_ledger(self, dead_letters_max: int = 1000) -> Ledger:
        """A ledger on this test's store; a second call opens the same store again."""

    def test_records_round_trip_and_one_device_never_sees_anothers_image(self) -> None:
        ledger = self.open_ledger(dead_letters_max=2)
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
                PhaseSet(mine, ImagePhase.FAILED, 2.0, ReasonCode.STORAGE_FAILED, "omero: no"),
                ImageRefused(theirs, ReasonCode.INVALID_MANIFEST, "junk", 3.0),
                *(_letter(n) for n in range(3)),
            ]
        )
        found = ledger.lookup([mine, theirs, ImageKey("scope-3", m.image_id)])
        assert set(found) == {mine, theirs}
        assert found[mine].phase is ImagePhase.FAILED and found[mine].manifest == m
        assert found[mine].close == close_for(m, tiles_for(m))
        assert (found[mine].reason, found[mine].detail) == (ReasonCode.STORAGE_FAILED, "omero: no")
        assert found[mine].tiles == {tile: b"d" * 16}
        assert found[mine].locations == {
            "archive": "/a.ome.tif",
            "omero": "omero:Image:4 dataset:1",
        }
        assert found[mine].digests == {"omero": "sha1:" + "ab" * 20}  # the archive's: unverified
        assert found[theirs].phase is ImagePhase.REJECTED and found[theirs].manifest is None
        assert [i.key for i in ledger.recover()] == [mine]  # its tiles are still staged
        letters = ledger.dead_letters()
        assert [d.detail for d in letters] == ["bug 2", "bug 1"]  # bounded, newest first
        ledger.close()

    def test_a_whole_batch_applied_twice_changes_nothing(self) -> None:
        ledger = self.open_ledger()
        m = make_manifest()
        key = ImageKey("scope-1", m.image_id)
        batch = [
            ImageOpened(key, m, 1.0),
            *(TileStaged(key, k, bytes([k.index]) * 16, 6144) for k in m.tile_keys()),
            CloseReceived(key, close_for(m, tiles_for(m))),
            PhaseSet(key, ImagePhase.STORING, 2.0),
            BackendStored(key, "archive", "/a"),
            BackendStored(key, "archive", "/b"),  # a backend's later location wins
        ]
        ledger.write(batch)
        first = ledger.lookup([key])[key]
        ledger.write(batch)
        again = ledger.lookup([key])[key]
        assert again == first
        assert again.phase is ImagePhase.STORING and again.locations == {"archive": "/b"}
        assert len(again.tiles) == m.tile_count
        ledger.close()

    def test_a_refusal_never_overwrites_an_accepted_image(self) -> None:
        ledger = self.open_ledger()
        m = make_manifest()
        key = ImageKey("scope-1", m.image_id)
        ledger.write([ImageOpened(key, m, 1.0), ImageRefused(key, ReasonCode.CONFLICT, "x", 2.0)])
        image = ledger.lookup([key])[key]
        assert image.phase is ImagePhase.RECEIVING and image.reason is None
        # ... but a refused image accepted later is receiving again, its reason cleared.
        other = ImageKey("scope-1", uuid4())
        m2 = make_manifest(image_id=other.image_id)
        ledger.write([ImageRefused(other, ReasonCode.INVALID_MANIFEST, "bad", 1.0)])
        ledger.write([ImageOpened(other, m2, 2.0)])
        again = ledger.lookup([other])[other]
        assert (again.phase, again.reason, again.detail) == (ImagePhase.RECEIVING, None, None)
        ledger.close()

    def test_recovery_of_some_devices_only_and_of_phases_holding_tiles(self) -> None:
        ledger = self.open_ledger()
        keys = {}
        for device, phase in [
            ("scope-1", ImagePhase.RECEIVING),
            ("scope-1", ImagePhase.COMPLETE),
            ("scope-2", ImagePhase.STORING),
            ("scope-3", ImagePhase.FAILED),
        ]:
            m = make_manifest()
            key = ImageKey(device, m.image_id)
            keys[(device, phase)] = key
            ledger.write(
                [
                    ImageOpened(key, m, 1.0),
                    TileStaged(key, TileKey(0), b"\x07" * 16, 6144),
                    PhaseSet(key, phase, 2.0),
                ]
            )
        everything = {i.key for i in ledger.recover()}
        assert everything == {
            keys[("scope-1", ImagePhase.RECEIVING)],
            keys[("scope-2", ImagePhase.STORING)],
            keys[("scope-3", ImagePhase.FAILED)],
        }
        some = ledger.recover(["scope-1", "scope-3"])
        assert {i.key for i in some} == {
            keys[("scope-1", ImagePhase.RECEIVING)],
            keys[("scope-3", ImagePhase.FAILED)],
        }
        assert all(i.tiles == {TileKey(0): b"\x07" * 16} for i in some)
        assert ledger.recover([]) == []
        ledger.close()

    def test_listings_are_newest_first_filtered_and_without_tiles(self) -> None:
        ledger = self.open_ledger()
        made = []
        for n, device in enumerate(["scope-1", "scope-2", "scope-1"]):
            m = make_manifest()
            key = ImageKey(device, m.image_id)
            made.append(key)
            ledger.write([ImageOpened(key, m, float(n)), TileStaged(key, TileKey(0), b"1" * 16, 1)])
        ledger.write([PhaseSet(made[0], ImagePhase.COMPLETE, 10.0)])
        listed = ledger.images()
        assert [i.key for i in listed] == [made[0], made[2], made[1]]
        assert all(i.tiles == {} for i in listed)
        assert [i.key for i in ledger.images(device="scope-1")] == [made[0], made[2]]
        receiving = ledger.images(phases=[ImagePhase.RECEIVING], limit=1)
        assert [i.key for i in receiving] == [made[2]]
        ledger.close()

    def test_what_was_written_is_there_after_reopening(self) -> None:
        ledger = self.open_ledger()
        m = make_manifest()
        key = ImageKey("scope-1", m.image_id)
        ledger.write([ImageOpened(key, m, 1.0), _letter(1)])
        ledger.close()
        reopened = self.open_ledger()
        assert reopened.lookup([key])[key].manifest == m
        assert [d.detail for d in reopened.dead_letters()] == ["bug 1"]
        reopened.close()

"""The image lifecycle, pure: every (state, event) pair, its rules, and random event sequences."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from uuid import uuid4

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from server_ingest.ledger.records import ImageKey, PhaseSet, TileStaged
from server_ingest.lifecycle import (
    Closed,
    Discard,
    Effect,
    Event,
    Forget,
    Image,
    Opened,
    OpenRefused,
    Persist,
    Policy,
    Publish,
    RemoveStaging,
    Retry,
    Send,
    Staged,
    Step,
    StoreBegin,
    StoreCancel,
    Stored,
    StoreDelayed,
    StoreDone,
    StoreFailed,
    StoreFinish,
    Tick,
    manifest_id,
    step,
)
from tilebridge_protocol.framing import tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    TileAck,
    TileDigest,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_storage.testing.manifests import make_manifest, make_tiles

MANIFEST = make_manifest(rows=1, columns=2, size_z=1, size_c=1, channels=["DAPI"])  # 2 tiles
OTHER = make_manifest(rows=1, columns=3, size_z=1, size_c=1, channels=["DAPI"])
CLOSE = CloseManifest(
    image_id=MANIFEST.image_id,
    tile_count=MANIFEST.tile_count,
    digests=tuple(
        TileDigest(tile=k, digest=tile_digest(v.tobytes()).hex())
        for k, v in make_tiles(MANIFEST).items()
    ),
)
PARTIAL = CloseManifest(
    image_id=MANIFEST.image_id, tile_count=1, digests=CLOSE.digests[:1], partial=True
)
"""Closed with the first tile only (a stopped scan)."""
KEY = ImageKey("scope-1", MANIFEST.image_id)
POLICY = Policy(image_ttl_s=100.0)
T0 = 1000.0
FIRST, SECOND = MANIFEST.tile_keys()

BASE = Image(KEY, Phase.RECEIVING, manifest_id(MANIFEST), MANIFEST.tile_count, last_seen=T0)
STATES: dict[str, Image | None] = {
    "unknown": None,
    "receiving": BASE,
    "receiving, one tile": replace(BASE, committed=1),
    "receiving, closed, one tile missing": replace(BASE, committed=1, closed=True),
    "storing": replace(BASE, phase=Phase.STORING, committed=2, closed=True),
    "complete": replace(
        BASE, phase=Phase.COMPLETE, committed=2, closed=True, locations=(("archive", "/a"),)
    ),
    "failed, tiles missing": replace(
        BASE, phase=Phase.FAILED, committed=1, reason=ReasonCode.STORAGE_FAILED, detail="no"
    ),
    "failed, all in": replace(
        BASE,
        phase=Phase.FAILED,
        committed=2,
        closed=True,
        reason=ReasonCode.STORAGE_FAILED,
        detail="no",
    ),
    "rejected, unreadable open": Image(
        KEY, Phase.REJECTED, reason=ReasonCode.MALFORMED, detail="not JSON"
    ),
    "rejected, this manifest": replace(
        BASE, phase=Phase.REJECTED, committed=0, reason=ReasonCode.QUOTA_EXCEEDED, detail="big"
    ),
    "expired, nothing staged": replace(BASE, phase=Phase.EXPIRED),
    "expired, one tile": replace(BASE, phase=Phase.EXPIRED, committed=1),
    "discarded": replace(BASE, phase=Phase.DISCARDED, committed=1),
}
LATER = T0 + 10
EVENTS: dict[str, Event] = {
    "open": Opened(LATER, MANIFEST),
    "open, other manifest": Opened(LATER, OTHER),
    "open refused": OpenRefused(LATER, ReasonCode.INVALID_MANIFEST, "bad"),
    "second tile staged": Staged(LATER, SECOND, b"d" * 16, MANIFEST.tile_bytes),
    "close": Closed(LATER, CLOSE, conflicts=0),
    "close contradicting staged tiles": Closed(LATER, CLOSE, conflicts=1),
    "partial close": Closed(LATER, PARTIAL, conflicts=0),
    "a backend stored": Stored("archive", "/a"),
    "store done": StoreDone(LATER),
    "store delayed": StoreDelayed("omero", "unreachable"),
    "store failed": StoreFailed(LATER, "omero", ReasonCode.STORAGE_FAILED, "permission denied"),
    "tick, early": Tick(T0 + 50),
    "tick, late": Tick(T0 + 101),
    "retry": Retry(LATER),
    "discard": Discard(LATER),
}

LETTERS: dict[str, Phase | None] = {
    "R": Phase.RECEIVING,
    "S": Phase.STORING,
    "C": Phase.COMPLETE,
    "F": Phase.FAILED,
    "X": Phase.REJECTED,
    "E": Phase.EXPIRED,
    "D": Phase.DISCARDED,
    "-": None,
}
# Rows: STATES in order; one letter per event of EVENTS, in order: the phase after it.
EXPECTED: dict[str, str] = {
    # open, open other manifest, open refused, tile staged, close, close contradicting,
    # partial close (of the first tile), a backend stored, store done, store delayed,
    # store failed, tick early, tick late, retry, discard. Letters: R S C F X E D as above,
    # "-" for unknown.
    "unknown": "RRX------------",
    "receiving": "RRRRRFRRRRFRERD",
    "receiving, one tile": "RRRRRFSRRRFRERD",
    "receiving, closed, one tile missing": "RRRSRRRRRRFRERD",
    "storing": "SSSSSSSSCSFSSSD",
    "complete": "CCCCCCCCCCCCCCC",
    # A resent open after a backend's failure is a retry (issue 13).
    "failed, tiles missing": "RFFFFFFFFFFFFRD",
    "failed, all in": "SFFFFFFFFFFFFSD",
    "rejected, unreadable open": "RRXXXXXXXXXXXXX",
    "rejected, this manifest": "RXXXXXXXXXXXXXX",
    "expired, nothing staged": "REEEEEEEEEEEEED",
    "expired, one tile": "REEEEEEEEEEEEED",
    "discarded": "DDDDDDDDDDDDDDD",
}

PAIRS = [(s, e) for s in STATES for e in EVENTS]


def flatten(effects: tuple[Effect, ...], durable: bool = False) -> Iterator[tuple[Effect, bool]]:
    """Every effect with whether it runs only after a Persist's records are durable."""
    for effect in effects:
        yield effect, durable
        if isinstance(effect, Persist):
            yield from flatten(effect.then, True)


def lets_go(effect: Effect) -> bool:
    """An ack after which the device may forget something."""
    if not isinstance(effect, Send):
        return False
    ack = effect.ack
    return (
        (isinstance(ack, OpenAck) and ack.state is ManifestState.ACCEPTED)
        or (isinstance(ack, TileAck) and ack.state is TileState.COMMITTED)
        or isinstance(ack, ImageAck)
    )


def run(state: str, event: str) -> Step:
    return step(STATES[state], KEY, EVENTS[event], POLICY)


def test_the_table_covers_every_state_and_event() -> None:
    assert list(EXPECTED) == list(STATES)
    assert all(len(row) == len(EVENTS) for row in EXPECTED.values())
    assert set("".join(EXPECTED.values())) <= set(LETTERS)


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_every_pair_goes_where_the_table_says(state: str, event: str) -> None:
    result = run(state, event)
    expected = LETTERS[EXPECTED[state][list(EVENTS).index(event)]]
    assert (result.image.phase if result.image else None) is expected


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_acks_that_let_the_device_forget_wait_for_durable_records(state: str, event: str) -> None:
    for effect, durable in flatten(run(state, event).effects):
        if lets_go(effect):
            assert durable, effect


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_only_a_permanent_refusal_or_a_contradiction_fails_an_image(state: str, event: str) -> None:
    before, after = STATES[state], run(state, event).image
    if (
        after is not None
        and after.phase is Phase.FAILED
        and (before is None or before.phase is not Phase.FAILED)
    ):
        assert event in ("store failed", "close contradicting staged tiles")


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_an_image_is_forgotten_only_once_durable(state: str, event: str) -> None:
    for effect, durable in flatten(run(state, event).effects):
        if isinstance(effect, Forget | RemoveStaging):
            assert durable, effect


@pytest.mark.parametrize(("state", "event"), PAIRS)
def test_a_failed_image_is_answered_only_when_every_tile_is_in(state: str, event: str) -> None:
    result = run(state, event)
    for effect, _ in flatten(result.effects):
        if isinstance(effect, Send) and isinstance(effect.ack, ImageAck):
            assert result.image is not None and result.image.all_in
            if effect.ack.state is ImageState.FAILED:
                assert effect.ack.reason is not None


# -- the stories behind the rules (issue 12's causes that live in the lifecycle) -------------


def test_a_store_delay_only_shows_on_the_status() -> None:
    """Cause 3 and 4: a full disk, a lost OMERO session are delays, retried by the storer."""
    result = run("storing", "store delayed")
    assert result.image is not None and result.image.phase is Phase.STORING
    assert result.image.delayed == "omero: unreachable"
    assert result.effects == (Publish(True),)


def test_a_resent_open_after_a_backend_failure_stores_the_staged_tiles_again() -> None:
    """Issue 13: a microscope re-sending an image that failed on the server is a retry."""
    result = run("failed, all in", "open")
    assert result.image is not None and result.image.phase is Phase.STORING
    assert result.image.reason is None and result.image.detail is None
    effects = [e for e, _ in flatten(result.effects)]
    assert StoreBegin() in effects and StoreFinish() in effects
    accepted = [e for e, durable in flatten(result.effects) if lets_go(e)]
    assert len(accepted) == 1 and isinstance(accepted[0], Send)
    assert isinstance(accepted[0].ack, OpenAck) and accepted[0].ack.state is ManifestState.ACCEPTED
    records = [r for e in effects if isinstance(e, Persist) for r in e.records]
    assert PhaseSet(KEY, Phase.RECEIVING, LATER) in records


def test_a_resent_open_does_not_retry_a_conflict() -> None:
    conflict = replace(STATES["failed, all in"], reason=ReasonCode.CONFLICT, detail="2 differ")
    result = step(conflict, KEY, Opened(LATER, MANIFEST), POLICY)
    assert result.image is not None and result.image.phase is Phase.FAILED
    acks = [e.ack for e, _ in flatten(result.effects) if isinstance(e, Send)]
    assert [type(a).__name__ for a in acks] == ["OpenAck", "ImageAck"]
    assert isinstance(acks[1], ImageAck) and acks[1].reason is ReasonCode.CONFLICT


def test_verified_digests_reach_the_complete_ack() -> None:
    image = STATES["storing"]
    for event in (Stored("omero", "omero:Image:3 dataset:1", "sha1:" + "ab" * 20),
                  Stored("archive", "/a", "sha1:" + "cd" * 20)):  # fmt: skip
        result = step(image, KEY, event, POLICY)
        assert result.image is not None
        image = result.image
    done = step(image, KEY, StoreDone(LATER), POLICY)
    [ack] = [e.ack for e, _ in flatten(done.effects) if isinstance(e, Send)]
    assert isinstance(ack, ImageAck) and ack.state is ImageState.COMPLETE
    assert ack.digests == {"omero": "sha1:" + "ab" * 20, "archive": "sha1:" + "cd" * 20}
    assert b'"digests"' in ack.to_bytes()
    failed = ImageAck(image_id=KEY.image_id, state=ImageState.FAILED)
    assert b"digests" not in failed.to_bytes()  # what an older device reads unchanged


def test_a_discard_by_the_retention_policy_says_so() -> None:
    detail = "removed by the staging retention policy (failed 30 days ago)"
    result = step(STATES["failed, all in"], KEY, Discard(LATER, detail), POLICY)
    assert result.image is not None and result.image.detail == detail
    acks = [e.ack for e, _ in flatten(result.effects) if isinstance(e, Send)]
    assert [a.detail for a in acks if isinstance(a, OpenAck)] == [detail]


def test_a_whole_image_completes_in_order() -> None:
    image: Image | None = None
    events: list[Event] = [
        Opened(T0, MANIFEST),
        Staged(T0 + 1, FIRST, b"a" * 16, 8),
        Closed(T0 + 2, CLOSE, 0),
        Staged(T0 + 3, SECOND, b"b" * 16, 8),
        Stored("archive", "/x"),
        StoreDone(T0 + 4),
    ]
    effects: list[Effect] = []
    for event in events:
        result = step(image, KEY, event, POLICY)
        image = result.image
        effects += [e for e, _ in flatten(result.effects)]
    assert image is not None and image.phase is Phase.COMPLETE
    records = [r for e in effects if isinstance(e, Persist) for r in e.records]
    assert [type(r).__name__ for r in records] == [
        "ImageOpened",
        "TileStaged",
        "CloseReceived",
        "TileStaged",
        "PhaseSet",
        "BackendStored",
        "PhaseSet",
    ]
    assert [r.phase for r in records if isinstance(r, PhaseSet)] == [Phase.STORING, Phase.COMPLETE]
    assert sum(isinstance(e, StoreFinish) for e in effects) == 1
    assert effects.index(StoreBegin()) < effects.index(StoreFinish())
    (final,) = [e.ack for e in effects if isinstance(e, Send) and isinstance(e.ack, ImageAck)]
    assert final.state is ImageState.COMPLETE and final.locations == {"archive": "/x"}
    assert isinstance(effects[-1], Forget)


def test_a_partial_close_stores_the_tiles_it_lists_and_a_repeat_is_answered_alike() -> None:
    image = STATES["receiving, one tile"]
    stored = step(image, KEY, Closed(LATER, PARTIAL, 0), POLICY)
    assert stored.image is not None and stored.image.phase is Phase.STORING
    assert (stored.image.tile_count, stored.image.committed) == (1, 1)
    assert StoreFinish() in stored.effects
    done = step(stored.image, KEY, StoreDone(LATER + 1), POLICY).image
    again = step(done, KEY, Closed(LATER + 2, PARTIAL, 0), POLICY)
    (ack,) = [e.ack for e, _ in flatten(again.effects) if isinstance(e, Send)]
    assert isinstance(ack, ImageAck) and ack.state is ImageState.COMPLETE


@pytest.mark.parametrize(("first", "then"), [(PARTIAL, CLOSE), (CLOSE, PARTIAL)])
def test_a_full_close_after_a_partial_one_or_the_reverse_is_a_conflict(
    first: CloseManifest, then: CloseManifest
) -> None:
    for state in ("receiving", "receiving, one tile"):  # still waiting, or storing already
        closed = step(STATES[state], KEY, Closed(LATER, first, 0), POLICY).image
        assert closed is not None
        result = step(closed, KEY, Closed(LATER + 1, then, 0), POLICY)
        assert result.image == closed  # the first close stands
        (refusal,) = [e.ack for e, _ in flatten(result.effects) if isinstance(e, Send)]
        assert isinstance(refusal, ErrorAck) and refusal.reason is ReasonCode.CONFLICT


def test_a_close_that_leaves_out_a_staged_tile_counts_only_what_it_lists() -> None:
    """Both tiles were staged; the close lists the first: the core dropped the second and
    says how many listed tiles are staged, so the image stores at once."""
    both = replace(BASE, committed=2)
    result = step(both, KEY, Closed(LATER, PARTIAL, 0, committed=1), POLICY)
    assert result.image is not None and result.image.phase is Phase.STORING
    assert (result.image.tile_count, result.image.committed) == (1, 1)


def test_an_expired_image_closed_as_partial_keeps_its_close_when_revived() -> None:
    closed = step(BASE, KEY, Closed(LATER, PARTIAL, 0), POLICY).image
    expired = step(closed, KEY, Tick(LATER + 200), POLICY).image
    assert expired is not None and expired.phase is Phase.EXPIRED
    revived = step(expired, KEY, Opened(LATER + 300, MANIFEST), POLICY).image
    assert revived is not None and revived.tile_count == 1
    stored = step(revived, KEY, Staged(LATER + 301, FIRST, b"a" * 16, 8), POLICY).image
    assert stored is not None and stored.phase is Phase.STORING


def test_an_expired_image_is_revived_with_its_tiles_by_its_open() -> None:
    expired = step(STATES["receiving, one tile"], KEY, Tick(T0 + 200), POLICY).image
    assert expired is not None and expired.phase is Phase.EXPIRED and expired.committed == 1
    revived = step(expired, KEY, Opened(T0 + 300, MANIFEST), POLICY)
    assert revived.image is not None and revived.image.phase is Phase.RECEIVING
    assert revived.image.committed == 1
    assert StoreBegin() in revived.effects


def test_an_expired_image_without_tiles_leaves_memory_and_staging() -> None:
    result = step(BASE, KEY, Tick(T0 + 200), POLICY)
    kinds = {type(e) for e, _ in flatten(result.effects)}
    assert {StoreCancel, RemoveStaging, Forget} <= kinds


def test_refusals_carry_their_reason() -> None:
    acks = [
        e.ack
        for e, _ in flatten(run("receiving", "open, other manifest").effects)
        if isinstance(e, Send)
    ]
    assert acks == [
        OpenAck(
            image_id=KEY.image_id,
            state=ManifestState.REJECTED,
            reason=ReasonCode.CONFLICT,
            detail="this image id is already open with another manifest",
        )
    ]
    (close_ack,) = [
        e.ack for e, _ in flatten(run("unknown", "close").effects) if isinstance(e, Send)
    ]
    assert isinstance(close_ack, ErrorAck) and close_ack.reason is ReasonCode.UNKNOWN_IMAGE


def test_discard_tells_the_device_to_set_the_image_aside() -> None:
    acks = [
        e.ack
        for e, _ in flatten(run("receiving, one tile", "discard").effects)
        if isinstance(e, Send)
    ]
    assert acks == [
        OpenAck(
            image_id=KEY.image_id,
            state=ManifestState.REJECTED,
            reason=ReasonCode.NOT_PERMITTED,
            detail="discarded by an administrator",
        )
    ]


# -- random sequences -------------------------------------------------------------------------

TILES = MANIFEST.tile_keys()


class Lifecycle(RuleBasedStateMachine):
    """Any order of events a real ingest can see; the rules hold after every one."""

    def __init__(self) -> None:
        super().__init__()
        self.image: Image | None = None
        self.now = T0
        self.staged: set[TileKey] = set()
        self.finished = False
        self.answered: list[ImageAck] = []
        self.records: list[object] = []

    def apply(self, event: Event) -> None:
        before = self.image
        result = step(self.image, KEY, event, POLICY)
        for effect, durable in flatten(result.effects):
            if lets_go(effect):
                assert durable
            if isinstance(effect, Persist):
                self.records += effect.records
            if isinstance(effect, Send) and isinstance(effect.ack, ImageAck):
                self.answered.append(effect.ack)
            if isinstance(effect, StoreFinish):
                self.finished = True
        self.image = result.image
        if (
            self.image is not None
            and self.image.phase is Phase.FAILED
            and (before is None or before.phase is not Phase.FAILED)
        ):
            assert isinstance(event, StoreFailed | Closed)

    @rule(dt=st.floats(0, 150))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(Tick(self.now))

    @rule()
    def open(self) -> None:
        self.apply(Opened(self.now, MANIFEST))

    @rule()
    def refused_open(self) -> None:
        self.apply(OpenRefused(self.now, ReasonCode.MALFORMED, "x"))

    @rule(tile=st.sampled_from(TILES))
    def tile(self, tile: TileKey) -> None:
        # The core posts Staged once per tile, and only while the image takes tiles.
        takes = self.image is not None and self.image.phase in (Phase.RECEIVING, Phase.FAILED)
        if takes and tile not in self.staged:
            self.staged.add(tile)
            self.apply(Staged(self.now, tile, b"t" * 16, 8))

    @rule(conflicts=st.sampled_from([0, 0, 0, 1]))
    def close(self, conflicts: int) -> None:
        self.apply(Closed(self.now, CLOSE, conflicts))

    @precondition(lambda self: self.finished)
    @rule()
    def store_done(self) -> None:
        self.apply(Stored("archive", "/a"))
        self.apply(StoreDone(self.now))

    @rule()
    def store_delayed(self) -> None:
        self.apply(StoreDelayed("omero", "down"))

    @rule()
    def store_failed(self) -> None:
        self.apply(StoreFailed(self.now, "omero", ReasonCode.STORAGE_FAILED, "refused"))

    @rule()
    def retry(self) -> None:
        self.apply(Retry(self.now))

    @rule()
    def discard(self) -> None:
        self.apply(Discard(self.now))

    @invariant()
    def counts_stay_within_the_manifest(self) -> None:
        if self.image is not None:
            assert self.image.committed <= max(self.image.tile_count, len(self.staged))

    @invariant()
    def complete_only_with_every_tile_and_the_close(self) -> None:
        if self.image is not None and self.image.phase is Phase.COMPLETE:
            assert self.image.all_in and len(self.staged) == MANIFEST.tile_count

    @invariant()
    def image_acks_only_when_all_in(self) -> None:
        for ack in self.answered:
            assert ack.state in (ImageState.COMPLETE, ImageState.FAILED)
        if self.answered:
            assert len(self.staged) == MANIFEST.tile_count

    @invariant()
    def every_staged_tile_is_recorded_once(self) -> None:
        tiles = [r.tile for r in self.records if isinstance(r, TileStaged)]
        assert len(tiles) == len(set(tiles))


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_new_key_per_device_means_no_squatting() -> None:
    """Another device's open of the same id is another image: it changes nothing here."""
    intruder = ImageKey("intruder", KEY.image_id)
    result = step(
        None, intruder, Opened(T0, OTHER.model_copy(update={"image_id": KEY.image_id})), POLICY
    )
    assert result.image is not None and result.image.key == intruder
    assert uuid4() != KEY.image_id

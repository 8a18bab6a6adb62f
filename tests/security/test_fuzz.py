"""Hostile input fed straight to `Ingest.handle`: it must answer, never crash, never write
outside its data directory, and never let a name escape into a path.

Real staging and ledger in a temporary directory, a fake outbox (acks land in a list) and a
fake scheduler (no storage backend runs). One ingest lives through every example of a test,
so state built up by earlier messages is fuzzed too.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from devtools.stack import wait_for
from server_ingest.app import Engine
from server_ingest.events import Inbound
from server_ingest.ledger.records import ImageKey
from server_ingest.ledger.sqlite import SqliteLedger
from server_ingest.settings import IngestSettings, Limits
from tests.security.fakes import FakeOutbox
from tilebridge_protocol.framing import HEADER, HEADER_SIZE, MAGIC, Codec, encode_tile, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    AnyAck,
    CloseManifest,
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    OpenManifest,
    PixelSize,
    StagePosition,
    TileAck,
    TileDigest,
    decode_ack,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_protocol.topics import DeviceTopic, check_device_id, device_topic

DEVICE = "scope-a"
OTHER = "scope-b"
CHUNK_SIZE = 128
LIMITS = Limits(
    max_chunk_bytes=4096,
    max_tile_bytes=1 << 20,
    max_tiles_per_image=1000,
    message_burst_per_device=1_000_000,
    refusals_answered_per_s_per_device=1e9,  # every refusal answered, to be checked
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written to the working directory, which is watched here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _manifest(image_id: UUID | None = None) -> OpenManifest:
    return OpenManifest(
        image_id=image_id or uuid4(),
        experiment="fuzz",
        project="security",
        dataset="hostile-input",
        image_name="scan 1",
        tile_width=16,
        tile_height=16,
        size_c=2,
        dtype="uint16",
        positions=(StagePosition(index=0, x_um=0, y_um=0), StagePosition(index=1, x_um=8, y_um=0)),
        pixel_size=PixelSize(x_um=0.5, y_um=0.5),
        channels=("DAPI", "GFP"),
        acquired_at=datetime(2026, 11, 24, tzinfo=UTC),
        key_values={"objective": "10x"},
        tags=("fuzz",),
    )


def _tiles(manifest: OpenManifest, seed: int) -> dict[TileKey, bytes]:
    rng = np.random.default_rng(seed)
    return {
        key: rng.integers(0, 60000, (16, 16), dtype="<u2").tobytes() for key in manifest.tile_keys()
    }


def _close(manifest: OpenManifest, tiles: dict[TileKey, bytes]) -> CloseManifest:
    return CloseManifest(
        image_id=manifest.image_id,
        tile_count=manifest.tile_count,
        digests=tuple(TileDigest(tile=k, digest=tile_digest(v).hex()) for k, v in tiles.items()),
    )


# The image every chunk example is about: opened once by DEVICE before fuzzing starts.
MANIFEST = _manifest(UUID("5a0b4c1e-0000-4000-8000-00000000f022"))
TILES = _tiles(MANIFEST, 1)
VALID_CHUNKS = [
    chunk
    for key, data in TILES.items()
    for chunk in encode_tile(MANIFEST.image_id, key, data, chunk_size=CHUNK_SIZE)
]
ZSTD_CHUNKS = [
    chunk
    for key, data in TILES.items()
    for chunk in encode_tile(MANIFEST.image_id, key, data, chunk_size=CHUNK_SIZE, codec=Codec.ZSTD)
]


@dataclass
class Env:
    root: Path
    data: Path
    engine: Engine
    outbox: FakeOutbox
    reasons: Counter[str] = field(default_factory=Counter)

    def send(self, topic: str, payload: bytes) -> list[tuple[str, AnyAck]]:
        """Handle one message; return the acks it caused, after checking each of them."""
        start = len(self.outbox.acks)
        self.engine.handle(Inbound(topic, payload))
        self.engine.wait_idle()  # nothing the core handed out is in flight
        assert self.engine.core._thread.is_alive()  # never ended by an input
        new = self.outbox.acks[start:]
        sender = topic.split("/")[3] if topic.count("/") == 4 else None
        for device, ack in new:
            assert isinstance(ack, TileAck | OpenAck | ImageAck | ErrorAck)
            assert decode_ack(ack.to_bytes()) == ack  # a valid Ack on the wire
            # An answer goes to the sender and to no one else.
            assert device == sender, (device, topic)
            check_device_id(device)
        return new

    def check_filesystem(self) -> None:
        """Everything under the temporary root is the ingest's data and has its expected
        shape: no file outside `data/`, no symlink, staging holds only device/image/tile."""
        staging = self.data / "staging"
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            for name in dirnames + filenames:
                path = here / name
                assert not path.is_symlink(), path
                assert path.resolve().is_relative_to(self.data.resolve()), path
            for name in filenames:
                path = here / name
                if here == self.data:
                    assert re.fullmatch(
                        r"ledger\.sqlite(-wal|-shm|-journal)?|ingest\.lock|control\.sock", name
                    ), path
                    continue
                rel = path.relative_to(staging).parts
                assert len(rel) == 3, path
                check_device_id(rel[0])
                UUID(rel[1])
                assert re.fullmatch(r"\d+_\d+_\d+_\d+\.(part|tile)", rel[2]), path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("fuzz-root")
    data = root / "data"
    cwd = Path.cwd()
    os.chdir(root)  # a relative path written by mistake would land here and be found
    outbox = FakeOutbox()
    # No backend: an image is complete once staged; its tiles stay staged to be checked.
    settings = IngestSettings(data_dir=data, limits=LIMITS, keep_staged=True)
    engine = Engine(settings, outbox, backends=[]).start()
    e = Env(root, data, engine, outbox)
    (ack,) = e.send(device_topic(DEVICE, DeviceTopic.OPEN), MANIFEST.to_bytes())
    assert isinstance(ack[1], OpenAck) and ack[1].state is ManifestState.ACCEPTED
    try:
        yield e
    finally:
        os.chdir(cwd)
        engine.stop()


# -- strategies ---------------------------------------------------------------------------------

small_or_any = st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1))
u16 = st.one_of(st.integers(0, 3), st.integers(0, 2**16 - 1))
u64 = st.one_of(st.integers(0, 1024), st.integers(0, 2**64 - 1))


@st.composite
def forged_chunk(draw: st.DrawFn) -> bytes:
    """Random header fields with a *valid* checksum: gets past the integrity check, so the
    ingest's own validation of every field is what is tested."""
    payload = draw(st.binary(max_size=600))
    codec = draw(st.sampled_from([0, 0, 1, 2, 255]))
    if codec == 1 and draw(st.booleans()):
        payload = zstandard.ZstdCompressor().compress(payload)
    version = draw(st.sampled_from([1, 1, 1, 0, 2]))
    magic = draw(st.sampled_from([MAGIC, MAGIC, MAGIC, b"BT"]))
    image_id = draw(st.sampled_from([MANIFEST.image_id, uuid4()]))
    digest = draw(
        st.sampled_from([tile_digest(TILES[TileKey(0, 0, 0, 0)]), tile_digest(payload), b"\0" * 16])
    )
    payload_len = len(payload) if draw(st.booleans()) else draw(small_or_any)
    head = HEADER.pack(
        magic,
        version,
        codec,
        image_id.bytes,
        draw(small_or_any),
        draw(u16),
        draw(u16),
        draw(small_or_any),
        draw(small_or_any),
        draw(small_or_any),
        draw(u64),
        draw(u64),
        draw(st.one_of(st.just(len(payload)), small_or_any)),
        payload_len,
        digest,
        0,
    )
    checked = head[: HEADER_SIZE - 8]
    hasher = xxhash.xxh3_64(checked)
    hasher.update(payload)
    return checked + hasher.digest() + payload


@st.composite
def mutated_chunk(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(VALID_CHUNKS + ZSTD_CHUNKS)))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "flip-header"]))
    if how == "truncate":
        return bytes(base[: draw(st.integers(0, len(base) - 1))])
    if how == "extend":
        return bytes(base + draw(st.binary(min_size=1, max_size=64)))
    limit = HEADER_SIZE - 1 if how == "flip-header" else len(base) - 1
    for pos, xor in draw(
        st.lists(st.tuples(st.integers(0, limit), st.integers(1, 255)), min_size=1, max_size=8)
    ):
        base[pos] ^= xor
    return bytes(base)


CHUNKS_BY_TILE = [
    list(encode_tile(MANIFEST.image_id, key, data, chunk_size=CHUNK_SIZE))
    for key, data in TILES.items()
]


@st.composite
def misdirected_chunk(draw: st.DrawFn) -> bytes:
    """A well-formed chunk about the wrong thing: an unknown image, a tile outside the
    manifest, a wrong tile size, or other content for a tile already committed."""
    image_id = draw(st.sampled_from([MANIFEST.image_id, uuid4()]))
    key = draw(
        st.one_of(st.builds(TileKey, u16, u16, u16, u16), st.sampled_from(MANIFEST.tile_keys()))
    )
    data = draw(st.sampled_from([TILES[TileKey(0, 0, 0, 0)], b"", draw(st.binary(max_size=700))]))
    chunks = list(encode_tile(image_id, key, data, chunk_size=CHUNK_SIZE))
    return draw(st.sampled_from(chunks))


chunk_payloads = st.one_of(
    st.sampled_from(VALID_CHUNKS + ZSTD_CHUNKS),
    mutated_chunk(),
    forged_chunk(),
    forged_chunk(),
    misdirected_chunk(),
    st.binary(max_size=300),
)

hostile_topics = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "tilebridge/v1/dev/../chunk",
            "tilebridge/v1/dev/./open",
            "tilebridge/v1/dev/a/b/chunk",
            "tilebridge/v1/dev//open",
            "tilebridge/v1/dev/scope-a/ack",
            "tilebridge/v1/dev/scope-a/status",
            "tilebridge/v2/dev/scope-a/open",
            "tilebridge/v1/dev/..%2f/open",
            "tilebridge/v1/dev/a\\b/open",
            "tilebridge/v1/dev/" + "x" * 200 + "/open",
        ]
    ),
)


def topics_for(kind: DeviceTopic) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(device_topic(DEVICE, kind)),
        st.just(device_topic(DEVICE, kind)),
        st.just(device_topic(OTHER, kind)),
        hostile_topics,
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

# Names that try to leave their directory or hide in it.
HOSTILE_NAMES = [
    "../../etc/passwd",
    "..",
    ".",
    "../x",
    "a/../../b",
    "a/b",
    "/abs",
    "a\\b",
    "..\\x",
    ".hidden",
    "x\x00y",
    "x\ny",
    "line\n",
    " leading",
    "-dash",
    "é",
    "a" * 129,
    "",
    "tab\t",
    "%2e%2e%2f",
    "~root",
]
NAME_FIELDS = ["experiment", "project", "dataset", "image_name"]


def _as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def open_payload(draw: st.DrawFn) -> bytes:
    base: dict[str, Any] = json.loads(_manifest(draw(st.uuids(version=4))).to_bytes())
    how = draw(st.sampled_from(["replace", "delete", "extra", "name", "nested", "random", "raw"]))
    if how == "random":
        return _as_json(draw(json_values))
    if how == "raw":
        return draw(st.binary(max_size=200))
    if how == "replace":
        base[draw(st.sampled_from(sorted(base)))] = draw(json_values)
    elif how == "delete":
        base.pop(draw(st.sampled_from(sorted(base))))
    elif how == "extra":
        base[draw(st.text(max_size=10))] = draw(json_values)
    elif how == "name":
        hostile = draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=40))
        where = draw(st.sampled_from([*NAME_FIELDS, "channels", "tags", "key_values"]))
        if where == "channels":
            base["channels"] = [hostile, "GFP"]
        elif where == "tags":
            base["tags"] = [hostile]
        elif where == "key_values":
            base["key_values"] = {hostile: "v"}
        else:
            base[where] = hostile
    else:
        target = draw(st.sampled_from(["positions", "pixel_size"]))
        if target == "positions":
            base["positions"][0][draw(st.sampled_from(["index", "x_um", "extra"]))] = draw(
                json_values
            )
        else:
            base["pixel_size"]["x_um"] = draw(json_values)
    return _as_json(base)


@st.composite
def close_payload(draw: st.DrawFn) -> bytes:
    base: dict[str, Any] = json.loads(_close(MANIFEST, TILES).to_bytes())
    how = draw(st.sampled_from(["count", "digest", "tile", "drop", "dup", "random", "other-image"]))
    if how == "random":
        return _as_json(draw(json_values))
    if how == "count":
        base["tile_count"] = draw(st.integers(-5, 10**12))
    elif how == "digest":
        base["digests"][0]["digest"] = draw(st.text(max_size=40))
    elif how == "tile":
        base["digests"][0]["tile"] = draw(json_values)
    elif how == "drop":
        base["digests"].pop()
        base["tile_count"] -= 1
    elif how == "dup":
        base["digests"][1] = base["digests"][0]
    else:
        base["image_id"] = str(uuid4())
    return _as_json(base)


# Inputs known to break naive decoders: deep nesting, huge fields echoed into a reason.
NASTY_JSON = [
    b"[" * 100_000,
    b'{"v": 1, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"v": "' + b"x" * 5000 + b'"}',
    b'{"v": 1, "image_id": "' + b"y" * 5000 + b'"}',
    _as_json(
        {
            **json.loads(MANIFEST.to_bytes()),
            "image_id": str(uuid4()),
            "key_values": {"k" * 3000: "v"},
        }
    ),
    _as_json({**json.loads(MANIFEST.to_bytes()), "image_id": str(uuid4()), "z" * 3000: 1}),
    b"\xff\xfe\x00",
    b"null",
    b"1e999999",
    b'{"v": 1e999}',
    b'{"v": 1, "image_id": null}',
]


# -- the properties -----------------------------------------------------------------------------


FIRST_KEY, FIRST_DATA = next(iter(TILES.items()))
OTHER_CONTENT = encode_tile(
    MANIFEST.image_id, FIRST_KEY, bytes(255 - b for b in FIRST_DATA), chunk_size=CHUNK_SIZE
)


@settings(FUZZ, max_examples=300)
# A committed tile sent again with other pixels: the `conflict` answer is reached every run,
# not only when the random draw finds it.
@example(
    messages=[(device_topic(DEVICE, DeviceTopic.CHUNK), next(OTHER_CONTENT))],
    tile=CHUNKS_BY_TILE[0],
    at=0,
)
@given(
    messages=st.lists(
        st.tuples(topics_for(DeviceTopic.CHUNK), chunk_payloads), min_size=1, max_size=8
    ),
    # a whole valid tile in any order, mixed in: the paths that stage and commit run too
    tile=st.sampled_from(CHUNKS_BY_TILE).flatmap(st.permutations),
    at=st.integers(0, 8),
)
def test_hostile_chunks_are_answered_never_crash_and_stay_in_the_data_dir(
    env: Env, messages: list[tuple[str, bytes]], tile: list[bytes], at: int
) -> None:
    topic = device_topic(DEVICE, DeviceTopic.CHUNK)
    seen = len(env.outbox.acks)
    for t, payload in messages[:at] + [(topic, c) for c in tile] + messages[at:]:
        env.send(t, payload)
    env.check_filesystem()
    env.reasons.update(str(getattr(a, "reason", None)) for _, a in env.outbox.acks[seen:])


@FUZZ
@given(topic=topics_for(DeviceTopic.OPEN), payload=open_payload())
@example(topic=device_topic(DEVICE, DeviceTopic.OPEN), payload=NASTY_JSON[0])
def test_hostile_open_manifests_are_answered_never_crash(
    env: Env, topic: str, payload: bytes
) -> None:
    env.send(topic, payload)
    env.check_filesystem()


@FUZZ
@given(topic=topics_for(DeviceTopic.CLOSE), payload=close_payload())
def test_hostile_close_manifests_are_answered_never_crash(
    env: Env, topic: str, payload: bytes
) -> None:
    env.send(topic, payload)
    env.check_filesystem()


@pytest.mark.parametrize("kind", [DeviceTopic.OPEN, DeviceTopic.CLOSE, DeviceTopic.CHUNK])
@pytest.mark.parametrize("payload", NASTY_JSON, ids=range(len(NASTY_JSON)))
def test_nasty_json_is_refused_with_a_reason(env: Env, kind: DeviceTopic, payload: bytes) -> None:
    acks = env.send(device_topic(DEVICE, kind), payload)
    assert acks, "a refused message is answered"
    for _, ack in acks:
        assert isinstance(ack, OpenAck | ErrorAck | TileAck)
        assert ack.reason is not None
        assert getattr(ack, "state", ManifestState.REJECTED) is not ManifestState.ACCEPTED
    env.check_filesystem()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("where", [*NAME_FIELDS, "channels", "tags", "key_values"])
def test_names_that_could_leave_a_directory_are_refused(env: Env, name: str, where: str) -> None:
    fields: dict[str, Any] = json.loads(_manifest().to_bytes())
    if where == "channels":
        fields["channels"] = [name, "GFP"]
    elif where == "tags":
        fields["tags"] = [name]
    elif where == "key_values":
        fields["key_values"] = {name: "v"}
    else:
        fields[where] = name
    (ack,) = [a for _, a in env.send(device_topic(DEVICE, DeviceTopic.OPEN), _as_json(fields))]
    assert isinstance(ack, OpenAck)
    assert ack.state is ManifestState.REJECTED
    assert ack.reason is ReasonCode.INVALID_MANIFEST
    key = ImageKey(DEVICE, UUID(fields["image_id"]))
    ledger = SqliteLedger(env.data / "ledger.sqlite")
    try:
        record = ledger.lookup([key]).get(key)
    finally:
        ledger.close()
    assert record is not None and record.phase is Phase.REJECTED and record.manifest is None
    env.check_filesystem()


@FUZZ
@given(
    name=st.text(min_size=1, max_size=40).filter(
        lambda s: bool(re.search(r"[/\\\x00-\x1f]|^\.|\.\.", s))
    )
)
def test_any_name_with_a_separator_or_leading_dot_is_refused(env: Env, name: str) -> None:
    fields: dict[str, Any] = json.loads(_manifest().to_bytes())
    fields["image_name"] = name
    (ack,) = [a for _, a in env.send(device_topic(DEVICE, DeviceTopic.OPEN), _as_json(fields))]
    assert isinstance(ack, OpenAck)
    if ".." in name and not re.search(r"[/\\\x00-\x1f]|^\.", name):
        return  # e.g. "a..b": no separator, so harmless as a file name; either answer is fine
    assert ack.state is ManifestState.REJECTED and ack.reason is ReasonCode.INVALID_MANIFEST


def test_an_honest_device_is_still_served_after_the_fuzzing(env: Env) -> None:
    """Whatever came before, a complete, valid image from a device gets through."""
    manifest = _manifest()
    tiles = _tiles(manifest, 7)
    acks = env.send(device_topic(OTHER, DeviceTopic.OPEN), manifest.to_bytes())
    assert [a.state for _, a in acks if isinstance(a, OpenAck)] == [ManifestState.ACCEPTED]
    for key, data in tiles.items():
        for chunk in encode_tile(manifest.image_id, key, data, chunk_size=CHUNK_SIZE):
            env.send(device_topic(OTHER, DeviceTopic.CHUNK), chunk)
    acks = env.send(device_topic(OTHER, DeviceTopic.CLOSE), _close(manifest, tiles).to_bytes())
    wait_for(
        lambda: [
            a
            for d, a in env.outbox.acks
            if isinstance(a, ImageAck)
            and d == OTHER
            and a.image_id == manifest.image_id
            and a.state is ImageState.COMPLETE
        ],
        20,
        "the image complete",
    )
    staged = env.data / "staging" / OTHER / str(manifest.image_id)
    assert sorted(p.name for p in staged.iterdir()) == sorted(f"{k.slug()}.tile" for k in tiles)
    for key, data in tiles.items():
        assert (staged / f"{key.slug()}.tile").read_bytes() == data
    env.check_filesystem()


def test_the_chunk_fuzzing_reached_the_interesting_answers(env: Env) -> None:
    """Guards the fuzzer itself: its inputs got past each check at least once."""
    if not env.reasons:
        pytest.skip("runs after the chunk fuzzing in the same module")
    for reason in [
        "None",
        "bad_checksum",
        "malformed",
        "out_of_range",
        "conflict",
        "unknown_image",
    ]:
        assert env.reasons[reason] > 0, (reason, env.reasons)

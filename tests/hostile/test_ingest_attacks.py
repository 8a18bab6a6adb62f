"""The ingest under attack by the holder of one device identity (EVIL), through the harness
(conftest.py: a production-configured broker, the real `server-ingest`, GOOD's real
`edge-agent simulate`): every attack is refused with its reason code, the ingest stays online
and under INGEST_RSS_BOUND, nothing is written outside the data directories (checked by the
fixture), and GOOD's scan completes within SCAN_TIMEOUT while the attack goes on."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from uuid import UUID, uuid4

import zstandard

from devtools.stack import wait_for
from tests.hostile.conftest import (
    EVIL,
    GOOD,
    INGEST_RSS_BOUND,
    SCAN_TIMEOUT,
    Hostile,
    RunningScan,
    ScanResult,
)
from tests.security.conftest import Probe
from tilebridge_protocol.framing import ChunkHeader, Codec, encode_chunk, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_storage.testing.manifests import make_manifest

MiB = 1024 * 1024
LIMITS = {
    "max_open_images_per_device": 16,
    "max_staged_bytes_per_device": 256 * MiB,
    "max_declared_bytes_per_device": 256 * MiB,
}
SCAN = {"columns": 3, "rows": 3, "tile_size": 256, "channels": 2}
SMALL = {"size_z": 1, "size_c": 1, "channels": ["DAPI"]}


class Attacker:
    """EVIL with a raw MQTT client: publishes anything on its own tree, reads its own acks."""

    def __init__(self, hostile: Hostile) -> None:
        self.probe: Probe = hostile.client(EVIL)
        self.probe.client.max_inflight_messages_set(1000)
        assert self.probe.connect() == "Success"
        self.probe.subscribe(device_topic(EVIL, DeviceTopic.ACK))

    def send(self, kind: DeviceTopic, payload: bytes, retain: bool = False) -> str:
        return self.probe.publish(device_topic(EVIL, kind), payload, retain=retain)

    def flood(self, kind: DeviceTopic, payloads: Iterable[bytes]) -> None:
        last = None
        for payload in payloads:
            last = self.probe.client.publish(device_topic(EVIL, kind), payload, qos=1)
        if last is not None:
            last.wait_for_publish(timeout=120)

    def acks(self) -> list[dict[str, Any]]:
        """Answers to its messages (not its flow-control windows, `credit` acks)."""
        acks = [json.loads(p) for _, p in self.probe.received(device_topic(EVIL, DeviceTopic.ACK))]
        return [a for a in acks if a["kind"] != "credit"]

    def reasons(self) -> list[str | None]:
        return [a.get("reason") for a in self.acks()]

    def wait_reason(self, reason: str, count: int = 1, timeout: float = 60) -> None:
        wait_for(lambda: self.reasons().count(reason) >= count, timeout, f"{count} x {reason}")


def scan_with_id(hostile: Hostile, image_id: UUID, name: str) -> ScanResult:
    """GOOD's scan of an image whose id the attacker may know (a repeat uses the same id)."""
    summary = hostile.sandbox.run / f"{name}.json"
    program = hostile.program("edge_agent", hostile.agent_config(GOOD), name)
    program.start(
        "simulate",
        *(x for k, v in SCAN.items() for x in (f"--{k.replace('_', '-')}", str(v))),
        "--image-id",
        str(image_id),
        "--timeout",
        str(SCAN_TIMEOUT),
        "--summary",
        str(summary),
    )
    return RunningScan(program, summary, SCAN_TIMEOUT).result()


def unharmed(hostile: Hostile, scan: ScanResult, peak: int) -> None:
    assert scan.ok, scan.log
    assert hostile.ingest is not None and hostile.ingest.running, hostile.ingest
    status = hostile.ingest_status() or {}
    assert status.get("state") == "online"
    assert peak < INGEST_RSS_BOUND, f"ingest RSS peaked at {peak / MiB:.0f} MiB"


def poison_chunk(image_id: UUID | None = None) -> bytes:
    """A correctly checksummed chunk whose zstd frame declares 1 TiB of content."""
    frame = (
        b"\x28\xb5\x2f\xfd\xe0"
        + struct.pack("<Q", 1 << 40)
        + (1 | (1 << 1) | ((128 * 1024) << 3)).to_bytes(3, "little")
        + b"\x00"
    )
    header = ChunkHeader(
        image_id or uuid4(), TileKey(0), 0, 1, 0, 1 << 20, 1 << 20, bytes(16), Codec.ZSTD
    )
    return encode_chunk(header, frame)


def bomb_chunk(raw_length: int, decoded: int) -> bytes:
    """A frame that does not declare its size and decodes to far more than the header says."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False)
    frame = compressor.compress(bytes(decoded))
    header = ChunkHeader(
        uuid4(), TileKey(0), 0, 1, 0, raw_length, raw_length, bytes(16), Codec.ZSTD
    )
    return encode_chunk(header, frame)


def during(hostile: Hostile, attack: threading.Thread) -> tuple[ScanResult, int]:
    """The attack and, meanwhile, GOOD's scan: its result and the ingest's peak RSS."""
    assert hostile.ingest is not None
    with hostile.rss(hostile.ingest) as rss:
        running = hostile.start_scan(**SCAN)
        attack.start()
        scan = running.result()
        attack.join(timeout=300)
    return scan, rss.peak


def test_poison_frame_and_retained_poison(hostile: Hostile) -> None:
    ingest = hostile.start_ingest(limits=LIMITS)
    evil = Attacker(hostile)
    evil.send(DeviceTopic.CHUNK, poison_chunk())
    evil.send(DeviceTopic.CHUNK, poison_chunk(), retain=True)
    evil.wait_reason("malformed", 2)
    ingest.stop()  # at every start the broker delivers the retained poison again
    hostile.start_ingest()
    evil.wait_reason("malformed", 3)
    details = [a.get("detail", "") for a in evil.acks() if a.get("reason") == "malformed"]
    assert "declares 1099511627776 bytes" in details[0]
    assert "retained" in details[-1]
    scan, peak = during(hostile, threading.Thread(target=lambda: None))
    unharmed(hostile, scan, peak)


def test_decompression_bombs(hostile: Hostile) -> None:
    hostile.start_ingest(limits=LIMITS)
    evil = Attacker(hostile)

    def attack() -> None:
        evil.flood(DeviceTopic.CHUNK, [bomb_chunk(128 * 1024, 256 * MiB) for _ in range(4)])
        # The amplification the quota allows: an image larger than the staging quota is
        # refused at its open, before a single chunk is taken.
        big = make_manifest(rows=8, columns=8, tile=(2048, 2048), **SMALL)  # 64 x 8 MiB
        evil.send(DeviceTopic.OPEN, big.to_bytes())

    scan, peak = during(hostile, threading.Thread(target=attack))
    evil.wait_reason("malformed", 4)
    evil.wait_reason("quota_exceeded")
    bombs = [a for a in evil.acks() if a.get("reason") == "malformed"]
    assert all("differs from header" in a["detail"] for a in bombs)
    unharmed(hostile, scan, peak)


def test_open_flood(hostile: Hostile) -> None:
    hostile.start_ingest(limits=LIMITS)
    evil = Attacker(hostile)
    small = [make_manifest(rows=1, columns=1, tile=(1, 1), **SMALL).to_bytes() for _ in range(300)]
    huge = make_manifest(rows=200, columns=180, **SMALL)  # 36 000 positions, 2.2 MB of JSON
    huge_opens = [huge.model_copy(update={"image_id": uuid4()}).to_bytes() for _ in range(12)]

    def attack() -> None:
        evil.flood(DeviceTopic.OPEN, small)
        evil.flood(DeviceTopic.OPEN, huge_opens)

    scan, peak = during(hostile, threading.Thread(target=attack))
    wait_for(lambda: len(evil.acks()) >= 30, 60, "answers to the flood")
    reasons = evil.reasons()
    assert reasons.count(None) <= 16  # accepted: up to max_open_images_per_device
    refused = [a for a in evil.acks() if a.get("reason") == "quota_exceeded"]
    assert any("images are receiving" in a["detail"] for a in refused)
    unharmed(hostile, scan, peak)


def test_chunk_flood(hostile: Hostile) -> None:
    hostile.start_ingest(limits=LIMITS)
    evil = Attacker(hostile)
    garbage = [b"TB\x01" + bytes(120) for _ in range(30_000)]
    scan, peak = during(
        hostile, threading.Thread(target=evil.flood, args=(DeviceTopic.CHUNK, garbage))
    )
    evil.wait_reason("malformed")
    assert set(evil.reasons()) <= {"malformed", "rate_limited"}, set(evil.reasons())
    unharmed(hostile, scan, peak)


def test_zero_length_flood(hostile: Hostile) -> None:
    hostile.start_ingest(limits=LIMITS)
    evil = Attacker(hostile)
    target = make_manifest(rows=1, columns=1, **SMALL)
    digest = tile_digest(bytes(target.tile_bytes))

    def empty_chunks() -> Iterator[bytes]:
        for index in range(30_000):
            header = ChunkHeader(
                target.image_id, TileKey(0), index, 30_000, 0, target.tile_bytes, 0, digest
            )
            yield encode_chunk(header, b"")

    evil.send(DeviceTopic.OPEN, target.to_bytes())
    scan, peak = during(
        hostile, threading.Thread(target=evil.flood, args=(DeviceTopic.CHUNK, empty_chunks()))
    )
    evil.wait_reason("out_of_range")
    assert set(evil.reasons()) <= {None, "out_of_range", "rate_limited"}
    unharmed(hostile, scan, peak)


def test_image_id_squatting(hostile: Hostile) -> None:
    """The attacker knows the id the microscope will use and opens it first, with junk."""
    hostile.start_ingest(limits=LIMITS)
    image_id = uuid4()
    junk = make_manifest(image_id=image_id, rows=1, columns=1, **SMALL)
    evil = Attacker(hostile)
    evil.send(DeviceTopic.OPEN, junk.to_bytes())
    wait_for(evil.acks, 30, "the junk open answered")
    evil.send(DeviceTopic.CHUNK, poison_chunk(image_id))
    assert hostile.ingest is not None
    with hostile.rss(hostile.ingest) as rss:
        scan = scan_with_id(hostile, image_id, "squatted")
    assert scan.summary["image_id"] == str(image_id)
    (stored,) = (hostile.sandbox.ingest_data / "archive").rglob("*.ome.tif")
    assert stored.relative_to(hostile.sandbox.ingest_data / "archive").parts[0] == GOOD
    assert str(image_id) in stored.name
    unharmed(hostile, scan, rss.peak)


def test_archive_names_never_collide(hostile: Hostile) -> None:
    """Two images whose ids share their first 8 hex digits, same name: two archive files."""
    hostile.start_ingest(limits=LIMITS)
    first = UUID("12345678-0000-4000-8000-000000000001")
    second = UUID("12345678-0000-4000-8000-000000000002")
    assert hostile.ingest is not None
    with hostile.rss(hostile.ingest) as rss:
        scans = [scan_with_id(hostile, first, "first"), scan_with_id(hostile, second, "second")]
    names = sorted(p.name for p in (hostile.sandbox.ingest_data / "archive").rglob("*.ome.tif"))
    assert names == [f"tilescan_{first}.ome.tif", f"tilescan_{second}.ome.tif"]
    for scan in scans:
        unharmed(hostile, scan, rss.peak)

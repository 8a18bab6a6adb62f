"""Corrupt, malformed, oversize and unknown-version messages through a real broker: each is
refused with a reason code on the device's ack topic, and the ingest keeps working."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import edge_agent.publisher
from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, wait_for
from edge_agent.app import EdgeApp
from edge_agent.settings import AgentSettings
from tests.edge.stack import acquire
from tests.end_to_end.conftest import (
    FAST_RETRY,
    SCAN,
    assert_archive_intact,
    start_ingest,
    wait_committed,
)
from tilebridge_protocol.framing import HEADER_SIZE, encode_tile
from tilebridge_protocol.keys import TileKey
from tilebridge_runtime.mqtt import BrokerSettings

ACKS = "tilebridge/v1/dev/scope-1/ack"


def _acks(watcher: Watcher) -> list[dict[str, Any]]:
    """The answers to messages (not the windows of flow control, `credit` acks)."""
    acks = [json.loads(p) for t, p, _ in watcher.messages if t == ACKS]
    return [a for a in acks if a["kind"] != "credit"]


def test_a_corrupted_chunk_gets_retransmit_and_the_tile_still_arrives(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    start_ingest(programs, broker, tmp_path)
    corrupted: list[TileKey] = []

    def corrupting(image_id: Any, key: TileKey, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        for n, message in enumerate(encode_tile(image_id, key, *args, **kwargs)):
            if key == TileKey(4, 0, 1, 0) and n == 0 and not corrupted:
                corrupted.append(key)
                broken = bytearray(message)
                broken[HEADER_SIZE + 10] ^= 0xFF  # a bit flip on the way
                yield bytes(broken)
            else:
                yield message

    monkeypatch.setattr(edge_agent.publisher, "encode_tile", corrupting)
    settings = AgentSettings(
        broker=BrokerSettings(port=broker.port), spool_dir=tmp_path / "spool",
        min_free_bytes=0, chunk_size=32 * 1024, **FAST_RETRY,
    )  # fmt: skip
    manifest = SCAN.manifest()
    with EdgeApp(settings) as agent:
        acquire(agent, manifest, SCAN.frame)
        result = agent.acquisition.wait_done(manifest.image_id, 60)
        assert agent.publisher.counters.retransmits >= 1
    assert result.server == "complete"
    assert corrupted == [TileKey(4, 0, 1, 0)]
    retransmits = [a for a in _acks(watcher) if a.get("state") == "retransmit"]
    assert retransmits[0]["reason"] == "bad_checksum"
    assert retransmits[0]["tile"] == [4, 0, 1, 0]
    assert_archive_intact(tmp_path)


class RawDevice:
    """A paho client posing as device scope-1, to send what the agent never would."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, "raw-scope-1", protocol=mqtt.MQTTv5)
        self.pubacks: dict[int, Any] = {}
        self._lock = threading.Lock()

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            with self._lock:
                self.pubacks[mid] = reason

        self.client.on_publish = on_publish
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, kind: str, payload: bytes) -> int:
        info = self.client.publish(f"tilebridge/v1/dev/scope-1/{kind}", payload, qos=1)
        wait_for(lambda: info.mid in self.pubacks, 10, "PUBACK")
        return info.mid

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_malformed_oversize_and_unknown_version_are_refused_and_the_ingest_goes_on(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path
) -> None:
    start_ingest(programs, broker, tmp_path, limits={"max_chunk_bytes": 64 * 1024})
    wait_for(lambda: watcher.latest("tilebridge/v1/ingest/ingest-1/status"), 30, "ingest up")
    device = RawDevice(broker)
    manifest = SCAN.manifest()
    try:
        device.send("chunk", b"definitely not a chunk")
        device.send("open", b"{broken json")
        future = json.loads(manifest.to_bytes())
        future["v"] = 2
        device.send("open", json.dumps(future).encode())
        device.send("chunk", b"TB\x05" + bytes(HEADER_SIZE))
        device.send("open", manifest.to_bytes())
        key = manifest.tile_keys()[0]
        big = next(
            encode_tile(manifest.image_id, key, SCAN.frame(key).tobytes(), chunk_size=128 * 1024)
        )
        device.send("chunk", big)
        wait_for(lambda: len(_acks(watcher)) >= 6, 30, "six answers")
    finally:
        device.close()
    # Above the broker's own message_size_limit: the broker drops it before the ingest sees it.
    # (Mosquitto answers with PUBACK reason 0x95, which paho 2.2 treats as a protocol error.)
    listener = Watcher(broker, "tilebridge/test/#")
    try:
        oversize = mqtt.Client(CallbackAPIVersion.VERSION2, "oversize", protocol=mqtt.MQTTv5)
        oversize.connect(broker.host, broker.port)
        oversize.publish("tilebridge/test/big", bytes(9 * 1024 * 1024), qos=1)
        oversize.publish("tilebridge/test/marker", b"after", qos=1)
        for _ in range(20):
            oversize.loop(timeout=0.1)
        wait_for(lambda: listener.latest_raw("tilebridge/test/marker"), 10, "the marker")
        assert listener.latest_raw("tilebridge/test/big") is None
    finally:
        listener.close()
    answers = [(a["kind"], a.get("state"), a["reason"]) for a in _acks(watcher)]
    assert answers == [
        ("error", None, "malformed"),
        ("error", None, "malformed"),
        ("open", "rejected", "unsupported_version"),
        ("error", None, "unsupported_version"),
        ("open", "accepted", None),
        ("tile", "rejected", "oversize"),
    ]
    ingest_status = "tilebridge/v1/ingest/ingest-1/status"
    status = wait_for(
        lambda: (s := watcher.latest(ingest_status)) and s["chunks_rejected"] >= 5 and s,
        30,
        "rejections counted on the ingest status",
    )
    assert status["state"] == "online"
    assert status["last_error"]
    # Still working: a well-behaved agent's scan goes through afterwards.
    settings = AgentSettings(
        broker=BrokerSettings(port=broker.port), spool_dir=tmp_path / "spool", min_free_bytes=0,
        chunk_size=32 * 1024, **FAST_RETRY,
    )  # fmt: skip
    with EdgeApp(settings) as agent:
        acquire(agent, manifest, SCAN.frame)
        wait_committed(watcher, manifest.image_id, manifest.tile_count)
        result = agent.acquisition.wait_done(manifest.image_id, 60)
    assert result.server == "complete"
    assert_archive_intact(tmp_path)


def _poison_chunk() -> bytes:
    """105-odd bytes that used to stop ingestion: a correctly checksummed chunk whose zstd
    frame declares 1 TiB of content (python-zstandard allocated it, MemoryError escaped the
    handler and killed the broker thread)."""
    import struct

    from tilebridge_protocol.framing import ChunkHeader, Codec, encode_chunk

    frame = (
        b"\x28\xb5\x2f\xfd\xe0"
        + struct.pack("<Q", 1 << 40)
        + (1 | (1 << 1) | ((128 * 1024) << 3)).to_bytes(3, "little")
        + b"\x00"
    )
    header = ChunkHeader(uuid4(), TileKey(0), 0, 1, 0, 1 << 20, 1 << 20, bytes(16), Codec.ZSTD)
    return encode_chunk(header, frame)


def test_a_poison_chunk_even_retained_never_stops_the_ingest(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path
) -> None:
    ingest = start_ingest(programs, broker, tmp_path)
    device = RawDevice(broker)
    try:
        device.send("chunk", _poison_chunk())
        # Retained on the device's own chunk topic: delivered to the ingest at every start.
        info = device.client.publish(
            "tilebridge/v1/dev/scope-1/chunk", _poison_chunk(), qos=1, retain=True
        )
        wait_for(lambda: info.mid in device.pubacks, 10, "PUBACK of the retained poison")
        wait_for(
            lambda: [a for a in _acks(watcher) if a["reason"] == "malformed"][1:],
            30,
            "both poison chunks refused",
        )
    finally:
        device.close()
    refusal = next(a for a in _acks(watcher) if a["reason"] == "malformed")
    assert refusal["state"] == "rejected" and "declares 1099511627776 bytes" in refusal["detail"]
    ingest.stop()
    start_ingest(programs, broker, tmp_path)  # the retained poison arrives again at once
    wait_for(
        lambda: len([a for a in _acks(watcher) if a["reason"] == "malformed"]) >= 3,
        30,
        "the retained poison refused after the restart",
    )
    assert programs["ingest"].running
    settings = AgentSettings(
        broker=BrokerSettings(port=broker.port), spool_dir=tmp_path / "spool", min_free_bytes=0,
        chunk_size=32 * 1024, **FAST_RETRY,
    )  # fmt: skip
    manifest = SCAN.manifest()
    with EdgeApp(settings) as agent:
        acquire(agent, manifest, SCAN.frame)
        result = agent.acquisition.wait_done(manifest.image_id, 60)
    assert result.server == "complete"
    assert_archive_intact(tmp_path)

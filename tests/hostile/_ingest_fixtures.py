"""The ingest under attack: a secured Mosquitto (password file, the repository's ACL), the real
`server-ingest` program, a well-behaved device (the real edge agent) and a hostile one (a
plain MQTT client with a valid device identity), an RSS sampler and an outside-writes check.

Kept here until the shared harness (tests/hostile/conftest.py, from the broker work) is on
main; then these fixtures move onto it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, ingest_program, wait_for
from edge_agent.agent import EdgeAgent
from edge_agent.api import FrameMetadata, TileScanWriter
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.messages import ImageState, OpenManifest
from tilebridge_protocol.topics import DeviceTopic, device_topic, ingest_status_topic
from tilebridge_runtime.mqtt import BrokerSettings

GOOD, HOSTILE = "scope-1", "scope-2"
MiB = 1024 * 1024

RSS_BOUND = 400 * MiB
"""The ingest's resident memory stays under this through every attack (idle it is ~110 MiB:
Python, numpy, pydantic, tifffile, zarr; every limit below bounds what an attack adds)."""
SCAN_BOUND_S = 90.0
"""The well-behaved device's scan (18 tiles of 128 KiB) completes within this, attack or not;
alone it takes about a second."""

LIMITS = {
    "max_open_images_per_device": 16,
    "max_staged_bytes_per_device": 256 * MiB,
    "max_declared_bytes_per_device": 256 * MiB,
    "max_manifest_bytes_per_device": 16 * MiB,
    "message_rate_per_device": 2000,
    "message_burst_per_device": 4000,
}
SCAN = SyntheticScan(columns=3, rows=3, tile_size=256, channels=2, seed=11)


class RssSampler:
    """Samples a process's resident memory every 50 ms; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self._process.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Hostile:
    """A device identity in an attacker's hands: publishes anything on its own tree and
    reads its own acks (all the ACL lets it)."""

    def __init__(self, broker: Mosquitto, password: str, name: str = HOSTILE) -> None:
        self.name = name
        self.acks: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, f"attacker-{secrets.token_hex(4)}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(name, password)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(device_topic(name, DeviceTopic.ACK), 1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("the attacker could not subscribe")

    def _message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.acks.append(json.loads(msg.payload))

    def send(self, kind: DeviceTopic, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(device_topic(self.name, kind), payload, qos=1, retain=retain)

    def flood(self, kind: DeviceTopic, payloads: Iterator[bytes] | list[bytes]) -> int:
        last, count = None, 0
        for payload in payloads:
            last = self.send(kind, payload)
            count += 1
        if last is not None:
            last.wait_for_publish(timeout=120)
        return count

    def reasons(self) -> list[str | None]:
        with self._lock:
            return [a.get("reason") for a in self.acks]

    def wait_reason(self, reason: str, count: int = 1, timeout: float = 60) -> None:
        wait_for(lambda: self.reasons().count(reason) >= count, timeout, f"{count} x {reason}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Site:
    root: Path
    broker: Mosquitto
    passwords: dict[str, str]
    ingest: Program
    rss: RssSampler
    watcher: Watcher
    data_dir: Path
    cwd: Path
    before: set[Path] = field(default_factory=set)

    def hostile(self) -> Hostile:
        return Hostile(self.broker, self.passwords[HOSTILE])

    def agent_settings(self, spool: str = "spool") -> AgentSettings:
        broker = BrokerSettings(port=self.broker.port, username=GOOD, password=self.passwords[GOOD])
        return AgentSettings(
            device_id=GOOD,
            broker=broker,
            spool_dir=self.root / spool,
            min_free_bytes=0,
            commit_timeout_s=2.0,
            max_commit_timeout_s=4.0,
            chunk_size=32 * 1024,
        )

    def scan(
        self, manifest: OpenManifest | None = None, spool: str = "spool"
    ) -> tuple[UUID, float]:
        """The well-behaved device acquires SCAN; returns its image id and seconds to done."""
        manifest = manifest or SCAN.manifest()
        started = time.monotonic()
        with EdgeAgent(self.agent_settings(spool)) as agent:
            writer = TileScanWriter(agent, manifest)
            for key in manifest.tile_keys():
                writer.write_frame(SCAN.frame(key), FrameMetadata(tile_index=key.index, c=key.c))
            writer.finalize()
            result = agent.wait_done([manifest.image_id], SCAN_BOUND_S)[manifest.image_id]
        elapsed = time.monotonic() - started
        assert result.state is ImageState.COMPLETE, result
        return manifest.image_id, elapsed

    def status(self) -> dict[str, Any]:
        return self.watcher.latest(ingest_status_topic("ingest-1")) or {}

    def assert_unharmed(self, scan_seconds: float | None = None) -> None:
        """Online, within memory, nothing written where it should not be."""
        print(f"ingest RSS peak {self.rss.peak / MiB:.0f} MiB, scan {scan_seconds or 0:.1f} s")
        assert self.ingest.running, self.ingest.log_tail()
        wait_for(lambda: self.status().get("state") == "online", 30, "the ingest online")
        assert self.rss.peak < RSS_BOUND, f"ingest RSS peaked at {self.rss.peak / MiB:.0f} MiB"
        if scan_seconds is not None:
            assert scan_seconds < SCAN_BOUND_S
        assert not list(self.cwd.iterdir()), list(self.cwd.iterdir())
        allowed = (
            self.data_dir,
            self.broker.workdir,
            self.root / "spool",
            self.root / "spool-2",
            self.root / "pytest-watch",
        )
        for path in self.root.rglob("*"):
            if path.is_file() and path not in self.before:
                if path.parent == self.root and path.name.startswith("ingest."):
                    continue  # the program's own config and log, written by this harness
                assert any(path.is_relative_to(a) for a in allowed), path

    def archive_files(self) -> list[Path]:
        return sorted((self.data_dir / "archive").rglob("*.ome.tif"))


@pytest.fixture(name="site")
def ingest_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    passwords = {name: secrets.token_urlsafe(24) for name in ("ingest", GOOD, HOSTILE, "monitor")}
    broker = Mosquitto.secured(tmp_path / "broker", passwords).start()
    credentials = {"username": "ingest", "password": passwords["ingest"]}
    data_dir = tmp_path / "ingest"
    ingest = ingest_program(broker, tmp_path, limits=LIMITS)
    ingest.config["broker"] = {"host": broker.host, "port": broker.port, **credentials}
    cwd = tmp_path / "ingest-cwd"  # a relative path written by mistake would land here
    cwd.mkdir()
    watcher = Watcher(
        broker, "tilebridge/v1/ingest/+/status", username="monitor", password=passwords["monitor"]
    )
    with monkeypatch.context() as m:
        m.chdir(cwd)
        ingest.start("run")
    rss = RssSampler(ingest.proc.pid if ingest.proc else 0)
    site = Site(tmp_path, broker, passwords, ingest, rss, watcher, data_dir, cwd)
    try:
        wait_for(lambda: site.status().get("state") == "online", 30, "the ingest online")
        site.before = {p for p in tmp_path.rglob("*") if p.is_file()}
        yield site
    finally:
        rss.stop()
        ingest.kill()
        watcher.close()
        broker.stop()

"""Throughput, latency and memory of the edge -> broker -> ingest path, against a raw baseline.

All figures come from one run on this machine, through the same Mosquitto (the repo's config):

  a) raw: plain paho QoS 1 publish -> subscribe of the same bytes in the same chunk size,
     with the subscriber in its own process (as the ingest is);
  b) tilebridge: tiles already in the agent's disk buffer, published and committed by a
     running `server-ingest` (durably staged, fsynced); b/a is the cost of safety;
  c) `write_frame` latency for 8 MiB frames with the broker up and with it down;
  d) the agent's peak RSS while it buffers and then drains a backlog of >= 2 GiB.

Usage: python benchmarks/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.broker import Mosquitto
from devtools.stack import Watcher, ingest_program, wait_for, wait_ingest_online
from edge_agent.app import EdgeApp
from edge_agent.models import ExperimentSpec
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.topics import INGEST_STATUS_FILTER
from tilebridge_runtime.mqtt import BrokerSettings

MiB = 1024 * 1024
console = Console()
HERE = Path(__file__).resolve().parent


def raw_baseline(broker: Mosquitto, total: int, chunk: int) -> float:
    """MB/s of plain paho QoS 1 publish -> subscribe (subscriber in another process)."""
    script = str(HERE / "raw_subscriber.py")
    sub = subprocess.Popen(
        [sys.executable, script, str(broker.port), "bench/raw", str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "ready"
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, "raw-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(32)
    acked = threading.Semaphore(0)
    pub.on_publish = lambda *_: acked.release()
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    payload = np.random.default_rng(0).integers(0, 4000, chunk // 2, dtype=np.uint16).tobytes()
    count = total // chunk
    window = max(1, (64 * MiB) // chunk)  # the same bytes in flight as the agent's default
    start = time.perf_counter()
    for n in range(count):
        if n >= window:
            acked.acquire()
        pub.publish("bench/raw", payload, qos=1)
    done_line = sub.stdout.readline().split()
    end = float(done_line[1])
    sub.wait(30)
    pub.loop_stop()
    pub.disconnect()
    return count * chunk / (end - start) / 1e6


def scan_manifest(tiles: int, size: int = 2048) -> tuple[OpenManifest, list[bytes]]:
    side = int(np.ceil(np.sqrt(tiles)))
    scan = SyntheticScan(columns=side, rows=int(np.ceil(tiles / side)), tile_size=size, seed=7)
    frames = [scan.frame(TileKey(i)).tobytes() for i in range(min(8, tiles))]
    return scan.manifest(), frames


def tilebridge_drain(
    broker: Mosquitto, workdir: Path, chunk: int, manifest: OpenManifest, frames: list[bytes]
) -> float:
    """MB/s from the first publish to the last `committed` ack, tiles pre-buffered."""
    settings = AgentSettings(
        broker=BrokerSettings(port=broker.port + 1),  # nobody listens: fill the buffer first
        spool_dir=workdir / "spool", chunk_size=chunk, min_free_bytes=0, status_interval_s=60,
    )  # fmt: skip
    agent = EdgeApp(settings)
    agent.acquisition.start(ExperimentSpec.from_manifest(manifest, targets=[], server=True))
    keys = manifest.tile_keys()
    for n, key in enumerate(keys):
        agent.spool.add_tile(manifest.image_id, key, frames[n % len(frames)])
    agent.acquisition.finalize(manifest.image_id)
    agent.spool.close()
    ingest = ingest_program(broker, workdir, backends=["archive"], instance="bench").start("run")
    watcher = Watcher(broker, INGEST_STATUS_FILTER)
    wait_ingest_online(watcher, "bench")
    watcher.close()
    live = AgentSettings(**{**settings.model_dump(), "broker": BrokerSettings(port=broker.port)})
    agent = EdgeApp(live)
    start = time.perf_counter()
    agent.start()
    wait_for(
        lambda: agent.publisher.counters.committed_tiles >= len(keys), 600, "all committed", 0.01
    )
    elapsed = time.perf_counter() - start
    agent.stop()
    ingest.stop()
    return len(keys) * manifest.tile_bytes / elapsed / 1e6


def write_latency(
    port: int, workdir: Path, frames: list[bytes], manifest: OpenManifest
) -> list[float]:
    settings = AgentSettings(
        broker=BrokerSettings(port=port), spool_dir=workdir, min_free_bytes=0, status_interval_s=60
    )
    times = []
    with EdgeApp(settings) as agent:
        door = agent.acquisition
        door.start(ExperimentSpec.from_manifest(manifest, targets=[], server=True))
        arrays = [np.frombuffer(f, dtype="<u2").reshape(2048, 2048) for f in frames]
        for n, key in enumerate(manifest.tile_keys()):
            t0 = time.perf_counter()
            door.write_frame(manifest.image_id, arrays[n % len(arrays)], tile_index=key.index)
            times.append(time.perf_counter() - t0)
    return times


RSS_SCRIPT = """
import json, sys, threading, time, numpy as np, psutil
from pathlib import Path
from edge_agent.app import EdgeApp
from edge_agent.models import ExperimentSpec
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_runtime.mqtt import BrokerSettings
port, spool, tiles = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
proc = psutil.Process(); peak = {"buffering": 0, "draining": 0}; phase = ["buffering"]
def sample():
    while True:
        peak[phase[0]] = max(peak[phase[0]], proc.memory_info().rss); time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
side = int(tiles ** 0.5) + 1
scan = SyntheticScan(columns=side, rows=side, tile_size=2048, seed=3)
manifest = scan.manifest()
frame = scan.frame(scan.manifest().tile_keys()[0])
settings = AgentSettings(broker=BrokerSettings(port=port), spool_dir=spool, min_free_bytes=0,
                         status_interval_s=60, commit_timeout_s=30)
agent = EdgeApp(settings).start()
agent.acquisition.start(ExperimentSpec.from_manifest(manifest, targets=[], server=True))
keys = manifest.tile_keys()[:tiles]
for key in keys:
    agent.acquisition.write_frame(manifest.image_id, frame, tile_index=key.index)
print(json.dumps({"buffered": agent.spool.stats().bytes}), flush=True)
phase[0] = "draining"
sys.stdin.readline()  # the broker and the ingest come up now
while agent.publisher.counters.committed_tiles < len(keys):
    time.sleep(0.05)
print(json.dumps({k: v / 2**20 for k, v in peak.items()}), flush=True)
agent.stop()
"""


def peak_rss(workdir: Path, backlog_tiles: int) -> dict[str, float]:
    port = Mosquitto(workdir / "rss-broker").port
    spool = str(workdir / "rss-spool")
    proc = subprocess.Popen(
        [sys.executable, "-c", RSS_SCRIPT, str(port), spool, str(backlog_tiles)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    buffered = json.loads(proc.stdout.readline())["buffered"]
    with Mosquitto(workdir / "rss-broker", port=port) as broker:
        ingest = ingest_program(broker, workdir / "rss", instance="rss").start("run")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        peaks = json.loads(proc.stdout.readline())
        proc.wait(60)
        ingest.stop()
    return {"backlog_gib": buffered / 2**30, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    tiles = 16 if args.quick else 64
    backlog = 40 if args.quick else 264  # 264 x 8 MiB = 2.06 GiB
    chunk_sizes = [256 * 1024, MiB, 4 * MiB]
    manifest, frames = scan_manifest(tiles)
    total = tiles * manifest.tile_bytes
    results = Table(title=f"throughput, {total / MiB:.0f} MiB of 8 MiB tiles, QoS 1, loopback")
    for column in ("chunk", "raw paho (a) MB/s", "tilebridge (b) MB/s", "b/a"):
        results.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for chunk in chunk_sizes:
            with Mosquitto(work / f"broker-{chunk}") as broker:
                a = raw_baseline(broker, total, chunk)
                b = tilebridge_drain(broker, work / f"tb-{chunk}", chunk, manifest, frames)
            results.add_row(f"{chunk // 1024} KiB", f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}")
        console.print(results)

        latency = Table(title="write_frame latency, 8 MiB frames (durable in the disk buffer)")
        for column in ("broker", "p50 ms", "p99 ms", "max ms"):
            latency.add_column(column, justify="right")
        with Mosquitto(work / "lat-broker") as broker:
            ingest = ingest_program(broker, work / "lat", instance="lat").start("run")
            up = write_latency(broker.port, work / "lat-up", frames, manifest)
            ingest.stop()
        down = write_latency(broker.port, work / "lat-down", frames, manifest)  # broker gone
        for name, values in (("up", up), ("down", down)):
            ms = sorted(v * 1000 for v in values)
            p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
            latency.add_row(name, f"{statistics.median(ms):.1f}", f"{p99:.1f}", f"{ms[-1]:.1f}")
        console.print(latency)

        rss = peak_rss(work, backlog)
        console.print(
            f"agent peak RSS with a {rss['backlog_gib']:.2f} GiB backlog: "
            f"{rss['buffering']:.0f} MiB while buffering (broker down), "
            f"{rss['draining']:.0f} MiB while draining it"
        )


if __name__ == "__main__":
    main()

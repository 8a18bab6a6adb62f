"""The acquisition front door, end to end: from the first `write_frame` to the server's
`complete` ack, through the real programs, against raw paho QoS 1 of the same bytes.

Per repetition and path, A/B in the same run through the same Mosquitto:
  A) raw: plain paho QoS 1 publish -> subscribe (subscriber in its own process) of the same
     bytes in the same chunk size, the same 64 MiB in flight;
  B) tilebridge, one of
     fast    - `edge-agent run` as a process, frames over its Unix socket (FastPathClient)
     http    - the same agent, frames POSTed to its HTTP API (edge_agent.client.EdgeClient)
     python  - an in-process EdgeApp, frames through `Acquisition.write_frame`
     each time from the first write_frame to the `complete` image ack (the ingest has
     verified, staged, fsynced and stored every tile in its archive).
The ratio is B throughput / A throughput; min / median / max over the repetitions.

Then `write_frame` latency on the fast path for 8 MiB frames (>= 500 samples), with the
broker up (the ingest draining meanwhile) and with the broker stopped.

    .venv/bin/python benchmarks/frontdoor.py [--reps 5] [--frames 32] [--samples 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.broker import Mosquitto, free_port
from devtools.stack import Watcher, agent_program, ingest_program, wait_for, wait_ingest_online
from edge_agent.app import EdgeApp
from edge_agent.client import EdgeClient
from edge_agent.fastpath_client import FastPathClient
from edge_agent.models import ExperimentSpec, FrameInfo
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.keys import TileKey
from tilebridge_runtime.mqtt import BrokerSettings

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent
TILE = 2048
CHUNK = MiB


def raw_seconds(broker: Mosquitto, total: int) -> float:
    """Seconds of plain paho QoS 1 publish -> subscribe of `total` bytes in 1 MiB messages."""
    sub = subprocess.Popen(
        [sys.executable, str(HERE / "raw_subscriber.py"), str(broker.port), "bench/raw",
         str(total)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "ready"
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, f"raw-{uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(32)
    acked = threading.Semaphore(0)
    pub.on_publish = lambda *_: acked.release()
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    payload = np.random.default_rng(0).integers(0, 4000, CHUNK // 2, dtype=np.uint16).tobytes()
    count, window = total // CHUNK, (64 * MiB) // CHUNK
    start = time.perf_counter()
    for n in range(count):
        if n >= window:
            acked.acquire()
        pub.publish("bench/raw", payload, qos=1)
    end = float(sub.stdout.readline().split()[1])
    sub.wait(30)
    pub.loop_stop()
    pub.disconnect()
    return end - start


class Completions:
    """Timestamps of `complete` image acks, from a plain subscriber on the ack topics."""

    def __init__(self, broker: Mosquitto) -> None:
        self.done: dict[str, float] = {}
        self.last_commit: dict[str, float] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("tilebridge/v1/dev/+/ack", qos=1)
        self.client.loop_start()

    def _message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ack = json.loads(msg.payload)
        if ack.get("kind") == "tile" and ack.get("state") == "committed":
            with self._cond:
                self.last_commit[ack["image_id"]] = time.perf_counter()
        if ack.get("kind") == "image" and ack.get("state") == "complete":
            with self._cond:
                self.done.setdefault(ack["image_id"], time.perf_counter())
                self._cond.notify_all()

    def wait(self, image_id: UUID, timeout: float = 600) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: str(image_id) in self.done, timeout):
                raise TimeoutError(f"image {image_id} never completed")
            return self.done[str(image_id)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_spec(frames: int, name: str) -> tuple[ExperimentSpec, list[TileKey]]:
    scan = SyntheticScan(columns=frames, rows=1, tile_size=TILE, image_id=uuid4(),
                         experiment=name)  # fmt: skip
    manifest = scan.manifest()
    spec = ExperimentSpec.from_manifest(manifest, targets=[], server=True, acquired_at=None)
    return spec, manifest.tile_keys()


Phases = tuple[float, float, float]
"""Seconds from the first write_frame to finalize returning (every frame durable on the
Pi), to the last tile `committed`, to `complete`."""


def run_path(path: str, door: Any, http: EdgeClient | None, done: Completions,
             frames: int, pool: list[np.ndarray[Any, Any]]) -> Phases:  # fmt: skip
    spec, keys = make_spec(frames, f"bench-{path}")
    image_id = spec.image_id
    assert image_id is not None
    if http is not None:
        http.start_experiment(**spec.model_dump(mode="json"))
    else:
        door.start(spec)
    start = time.perf_counter()
    for n, key in enumerate(keys):
        frame = pool[n % len(pool)]
        if http is not None:
            http.write_frame(image_id, frame, tile_index=key.index)
        else:
            door.write_frame(image_id, frame, FrameInfo(tile_index=key.index))
    if http is not None:
        http.finalize(image_id)
    else:
        door.finalize(image_id)
    acquired = time.perf_counter() - start
    complete = done.wait(image_id) - start
    committed = done.last_commit.get(str(image_id), start) - start
    return acquired, committed, complete


def throughput(args: argparse.Namespace, work: Path, pool: list[np.ndarray[Any, Any]]) -> None:
    total = args.frames * TILE * TILE * 2
    with Mosquitto(work / "broker") as broker:
        ingest = ingest_program(broker, work, backends=["archive"], instance="bench").start("run")
        watcher = Watcher(broker, "tilebridge/v1/ingest/+/status")
        wait_ingest_online(watcher, "bench")
        watcher.close()
        http_port = free_port()
        agent = agent_program(broker, work, http_port=http_port, status_interval_s=5,
                              min_free_bytes=0, local_output_root=str(work))  # fmt: skip
        agent.start("run")
        socket_path = Path(agent.config["spool_dir"]) / "acquire.sock"
        wait_for(socket_path.exists, 30, "the agent's socket")
        done = Completions(broker)
        settings = AgentSettings(
            device_id="scope-2", broker=BrokerSettings(port=broker.port),
            spool_dir=work / "spool-python", min_free_bytes=0, status_interval_s=5,
            fast_path=False, local_output_root=work,
        )  # fmt: skip
        ratios: dict[str, list[float]] = {"fast": [], "http": [], "python": []}
        phases: dict[str, list[Phases]] = {path: [] for path in ratios}
        try:
            with FastPathClient(socket_path) as fast, EdgeClient(
                f"http://127.0.0.1:{http_port}", timeout=120
            ) as http, EdgeApp(settings) as app:  # fmt: skip
                for rep in range(args.reps):
                    for path, values in ratios.items():
                        a = raw_seconds(broker, total)
                        door = {"fast": fast, "http": None, "python": app.acquisition}[path]
                        timings = run_path(path, door, http if path == "http" else None,
                                           done, args.frames, pool)  # fmt: skip
                        phases[path].append(timings)
                        b = timings[-1]
                        values.append(a / b)
                        print(f"rep {rep} {path:6} raw {total / a / 1e6:6.0f} MB/s  "
                              f"tilebridge {total / b / 1e6:6.0f} MB/s  ratio {a / b:.2f}",
                              flush=True)  # fmt: skip
        finally:
            done.close()
            agent.stop()
            ingest.stop()
    print(f"\n== end to end, first write_frame -> `complete`, {args.frames} x 8 MiB, "
          f"{args.reps} reps, ratio to raw paho QoS 1 of the same bytes ==")  # fmt: skip
    for path, values in ratios.items():
        print(f"{path:6} min {min(values):.2f}  median {statistics.median(values):.2f}  "
              f"max {max(values):.2f}")  # fmt: skip
    print("\n== where the time goes (medians, s from the first write_frame) ==")
    for path, runs in phases.items():
        acquired, committed, complete = (statistics.median(p) for p in zip(*runs, strict=True))
        print(f"{path:6} every frame durable on the Pi {acquired:.2f}  last tile committed "
              f"{committed:.2f}  complete {complete:.2f}")  # fmt: skip


def latency(args: argparse.Namespace, work: Path, pool: list[np.ndarray[Any, Any]]) -> None:
    print(f"\n== write_frame over the fast path, 8 MiB frames, {args.samples} samples ==")
    for state in ("up", "down"):
        root = work / f"lat-{state}"
        with Mosquitto(root / "broker") as broker:
            ingest = None
            if state == "up":
                ingest = ingest_program(broker, root, instance="lat").start("run")
            agent = agent_program(broker, root, status_interval_s=5, min_free_bytes=0)
            if state == "down":
                agent.config["broker"] = {"host": "127.0.0.1", "port": free_port()}
            agent.start("run")
            socket_path = Path(agent.config["spool_dir"]) / "acquire.sock"
            wait_for(socket_path.exists, 30, "the agent's socket")
            spec, keys = make_spec(args.samples, f"latency-{state}")
            assert spec.image_id is not None
            times = []
            try:
                with FastPathClient(socket_path) as client:
                    client.start(spec)
                    for n, key in enumerate(keys):
                        t0 = time.perf_counter()
                        client.write_frame(spec.image_id, pool[n % len(pool)],
                                           FrameInfo(tile_index=key.index))  # fmt: skip
                        times.append((time.perf_counter() - t0) * 1000)
                    client.abort(spec.image_id)
            finally:
                agent.stop()
                if ingest is not None:
                    ingest.stop()
        ms = np.array(times)
        p50, p90, p99 = (np.percentile(ms, q) for q in (50, 90, 99))
        print(f"broker {state:4}: p50 {p50:5.1f}  p90 {p90:5.1f}  p99 {p99:5.1f}  "
              f"max {ms.max():6.1f} ms", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--frames", type=int, default=32, help="8 MiB frames per scan")
    parser.add_argument("--samples", type=int, default=500, help="write_frame latency samples")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="where the spools, staging and archive go (e.g. /dev/shm: the software's cost "
        "without this machine's one disk, which every part shares here)",
    )  # fmt: skip
    args = parser.parse_args()
    scan = SyntheticScan(columns=2, rows=2, tile_size=TILE, seed=7)
    pool = [scan.frame(TileKey(i)) for i in range(4)]
    with tempfile.TemporaryDirectory(prefix="tb-frontdoor-", dir=args.workdir) as tmp:
        if not args.skip_throughput:
            throughput(args, Path(tmp) / "tp", pool)
        if not args.skip_latency:
            latency(args, Path(tmp), pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())

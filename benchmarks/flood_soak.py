"""A well-behaved device's committed throughput while another device floods the ingest, as a
ratio of its throughput alone (target >= 0.8). Not a test: `make test` asserts no timings.

One secured Mosquitto (the repository's config and ACL) and one running `server-ingest` for
the whole run. Each repetition drains the same backlog (tiles pre-buffered in the agent's
disk buffer, as in throughput.py) from the first publish to the last `committed` ack; runs
alternate alone / during a flood (A/B/A/B...). The flood comes from another process with
another device identity, publishing as fast as one paho client can:

  garbage      chunks that fail verification (the issue's small-message flood)
  zero         zero-length chunks of an opened image (the quadratic-overlap attack)
  open         opens of 1x1-tile images (the open flood)

Usage: python benchmarks/flood_soak.py [--runs 5] [--tiles 48] [--flood garbage]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from devtools.broker import Mosquitto
from devtools.stack import Watcher, ingest_program, wait_for, wait_ingest_online
from edge_agent.app import EdgeApp
from edge_agent.models import ExperimentSpec
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.topics import INGEST_STATUS_FILTER
from tilebridge_runtime.mqtt import BrokerSettings

console = Console()
GOOD, FLOODER = "scope-1", "scope-2"

FLOODER_SCRIPT = """
import sys, uuid, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tilebridge_protocol.framing import ChunkHeader, encode_chunk, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_storage.testing.manifests import make_manifest
port, password, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = mqtt.Client(CallbackAPIVersion.VERSION2, "flooder", protocol=mqtt.MQTTv5)
c.username_pw_set("scope-2", password)
c.max_inflight_messages_set(1000)
c.connect("127.0.0.1", port)
c.loop_start()
root = "tilebridge/v1/dev/scope-2/"
m = make_manifest(rows=1, columns=1, size_z=1, size_c=1, channels=["DAPI"])
c.publish(root + "open", m.to_bytes(), qos=1).wait_for_publish(10)
digest = tile_digest(bytes(m.tile_bytes))
print("flooding", flush=True)
n = 0
while True:
    n += 1
    if kind == "garbage":
        topic, payload = "chunk", b"TB\\x01" + bytes(120)
    elif kind == "zero":
        h = ChunkHeader(m.image_id, TileKey(0), n % 30000, 30000, 0, m.tile_bytes, 0, digest)
        topic, payload = "chunk", encode_chunk(h, b"")
    else:
        o = make_manifest(rows=1, columns=1, tile=(1, 1), size_z=1, size_c=1, channels=["DAPI"])
        topic, payload = "open", o.to_bytes()
    info = c.publish(root + topic, payload, qos=1)
    if n % 1000 == 0:
        info.wait_for_publish(30)
"""


def drain(broker: Mosquitto, password: str, work: Path, run: int, tiles: int) -> float:
    """MB/s of committed tiles from the first publish to the last commit ack."""
    scan = SyntheticScan(columns=tiles, rows=1, tile_size=1024, seed=run)
    manifest = scan.manifest()
    frame = scan.frame(TileKey(0)).tobytes()
    offline = AgentSettings(
        device_id=GOOD,
        broker=BrokerSettings(port=broker.port + 1),  # nobody there: buffer everything first
        spool_dir=work / f"spool-{run}",
        min_free_bytes=0,
        status_interval_s=60,
    )
    agent = EdgeApp(offline)
    agent.acquisition.start(ExperimentSpec.from_manifest(manifest, targets=[], server=True))
    for key in manifest.tile_keys():
        agent.spool.add_tile(manifest.image_id, key, frame)
    agent.acquisition.finalize(manifest.image_id)
    agent.spool.close()
    live = BrokerSettings(port=broker.port, username=GOOD, password=password)
    agent = EdgeApp(AgentSettings(**{**offline.model_dump(), "broker": live}))
    started = time.perf_counter()
    agent.start()
    wait_for(
        lambda: agent.publisher.counters.committed_tiles >= len(manifest.tile_keys()),
        600,
        "every tile committed",
        0.01,
    )
    elapsed = time.perf_counter() - started
    agent.stop()
    return manifest.tile_count * manifest.tile_bytes / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each (>= 5)")
    parser.add_argument("--tiles", type=int, default=48, help="2 MiB tiles per drain")
    parser.add_argument("--flood", choices=["garbage", "zero", "open"], default="garbage")
    args = parser.parse_args()
    passwords = {n: secrets.token_urlsafe(16) for n in ("ingest", GOOD, FLOODER, "monitor")}
    alone, flooded, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with Mosquitto.secured(work / "broker", passwords) as broker:
            ingest = ingest_program(broker, work, backends=["archive"])
            ingest.config["broker"] = {
                "host": broker.host,
                "port": broker.port,
                "username": "ingest",
                "password": passwords["ingest"],
            }
            ingest.start("run")
            watcher = Watcher(
                broker, INGEST_STATUS_FILTER, username="monitor", password=passwords["monitor"]
            )
            wait_ingest_online(watcher)
            watcher.close()
            try:
                for run in range(args.runs):
                    a = drain(broker, passwords[GOOD], work, 2 * run, args.tiles)
                    flooder = subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            FLOODER_SCRIPT,
                            str(broker.port),
                            passwords[FLOODER],
                            args.flood,
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    assert flooder.stdout is not None
                    assert flooder.stdout.readline().strip() == "flooding"
                    time.sleep(1.0)  # let the flood build up before the scan starts
                    try:
                        b = drain(broker, passwords[GOOD], work, 2 * run + 1, args.tiles)
                    finally:
                        flooder.kill()
                        flooder.wait(10)
                    alone.append(a)
                    flooded.append(b)
                    ratios.append(b / a)
                    console.print(
                        f"run {run + 1}: alone {a:.0f} MB/s, flooded {b:.0f} MB/s, "
                        f"ratio {b / a:.2f}"
                    )
            finally:
                ingest.stop()
    table = Table(title=f"well-behaved device during a {args.flood} flood, {args.runs} runs")
    for column in ("", "min", "median", "max"):
        table.add_column(column, justify="right")
    for name, values in (("alone MB/s", alone), ("flooded MB/s", flooded), ("ratio", ratios)):
        table.add_row(name, *(f"{f(values):.2f}" for f in (min, statistics.median, max)))
    console.print(table)


if __name__ == "__main__":
    main()

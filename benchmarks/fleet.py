"""Fleet benchmark: 1, 10, 50, 100 simulated devices against 1 and against 2 ingest instances.

    make bench-fleet        # or: .venv/bin/python benchmarks/fleet.py --total-mib 400

Every run gets a fresh Mosquitto (the repo's config: its byte limit per session), the real
`server-ingest` processes (one: the SQLite ledger; several: a shared subscription and a
PostgreSQL ledger, devtools/postgres.py) writing the local archive, and the devices of
benchmarks/fleet_devices.py in a process of their own (each device one image of 2 MiB
tiles, the total split over the fleet). Printed per configuration, and as ratios to the
single-device single-instance figure of the same run: aggregate committed throughput (all
bytes over first publish -> last `complete`), the broker's peak RSS (sampled every 50 ms), and
close -> complete latency p50/p99. Then the same largest fleet with the ingest stopped for a
while mid-run: the broker's peak RSS while no ingest takes anything.
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

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.broker import Mosquitto  # noqa: E402
from devtools.postgres import Postgres  # noqa: E402
from devtools.stack import Program, Watcher, broker_config, wait_for  # noqa: E402

MiB = 1024 * 1024
TILE_BYTES = 2 * MiB


def cpu_s(pids: list[int], children: bool = False) -> float:
    """User + system CPU seconds of these processes (and their children) so far."""
    total = 0.0
    for pid in pids:
        try:
            procs = [psutil.Process(pid)]
            if children:
                procs += procs[0].children(recursive=True)
            for proc in procs:
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


def postmaster(pg: Postgres | None) -> list[int]:
    pid_file = pg.data / "postmaster.pid" if pg is not None else None
    if pid_file is None or not pid_file.exists():
        return []
    return [int(pid_file.read_text().splitlines()[0])]


class RssPeak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self._done = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def ingest(broker: Mosquitto, work: Path, name: str, dsn: str | None, flow: bool) -> Program:
    config: dict[str, Any] = {
        "instance": name,
        "broker": broker_config(broker),
        "data_dir": str(work / name),
        "staging_root": str(work / "staging"),
        "archive_dir": str(work / "archive"),
        "status_interval_s": 1.0,
        "flow": {"enabled": flow},
        "limits": {"max_open_images_per_device": 4},
    }
    if dsn is not None:
        config["ledger"] = {"kind": "postgres", "dsn": dsn}
        config["cluster"] = {"subscription": "shared", "lease_s": 10.0}
    return Program("server_ingest", config, work, name)


def start_all(broker: Mosquitto, programs: list[Program]) -> None:
    watcher = Watcher(broker, "tilebridge/v1/ingest/+/status")
    try:
        for p in programs:
            p.start("run")
        for p in programs:
            topic = f"tilebridge/v1/ingest/{p.config['instance']}/status"
            wait_for(lambda t=topic: (watcher.latest(t) or {}).get("broker_connected"), 60, topic)
    finally:
        watcher.close()


def run(
    devices: int,
    instances: int,
    total_mib: int,
    pg: Postgres | None,
    flow: bool = True,
    down_s: float = 0.0,
) -> dict[str, Any]:
    tiles = max(1, total_mib * MiB // TILE_BYTES // devices)
    with tempfile.TemporaryDirectory(prefix="tb-fleet-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker").start()
        dsn = None
        if instances > 1:
            assert pg is not None
            name = f"fleet_{int(time.time() * 1000)}"
            with psycopg.connect(pg.dsn, autocommit=True) as db:
                db.execute(f"CREATE DATABASE {name}")
            dsn = pg.dsn.replace("dbname=tilebridge", f"dbname={name}")
        programs = [ingest(broker, work, f"ingest-{n}", dsn, flow) for n in range(instances)]
        try:
            start_all(broker, programs)
            assert broker.proc is not None
            rss = RssPeak(broker.proc.pid)
            rss.start()
            out = work / "devices.json"
            ingest_pids = [p.proc.pid for p in programs if p.proc is not None]
            cpu0 = {
                "broker": cpu_s([broker.proc.pid]),
                "ingest": cpu_s(ingest_pids),
                "postgres": cpu_s(postmaster(pg), children=True) if dsn else 0.0,
            }
            sim = subprocess.Popen(
                [sys.executable, str(ROOT / "benchmarks" / "fleet_devices.py"),
                 "--port", str(broker.port), "--devices", str(devices), "--tiles", str(tiles),
                 "--out", str(out)],
                cwd=ROOT,
            )  # fmt: skip
            down_peak = 0
            if down_s:
                time.sleep(3.0)
                for p in programs:
                    p.kill()
                down = RssPeak(broker.proc.pid)
                down.start()
                time.sleep(down_s)
                down_peak = down.stop()
                start_all(broker, programs)
            sim.wait(timeout=1800)
            peak = rss.stop()
            cpu = {
                "broker": cpu_s([broker.proc.pid]) - cpu0["broker"],
                "ingest": cpu_s([p.proc.pid for p in programs if p.proc is not None])
                - (cpu0["ingest"] if not down_s else 0.0),
                "postgres": (cpu_s(postmaster(pg), children=True) - cpu0["postgres"])
                if dsn
                else 0.0,
            }
        finally:
            for p in programs:
                p.stop()
            broker.stop()
        timings = json.loads(out.read_text())
    done = [t for t in timings if "complete" in t]
    if len(done) != devices:
        raise RuntimeError(f"{devices - len(done)} of {devices} images never completed")
    first = min(t["first"] for t in done)
    last = max(t["complete"] for t in done)
    nbytes = sum(t["tile_bytes"] * t["tiles"] for t in done)
    latency = sorted(t["complete"] - t["close"] for t in done)
    return {
        "devices": devices,
        "instances": instances,
        "mib": nbytes / MiB,
        "mb_s": nbytes / (last - first) / 1e6,
        "rss_mib": peak / MiB,
        "down_rss_mib": down_peak / MiB,
        "p50_s": statistics.median(latency),
        "p99_s": latency[min(len(latency) - 1, round(0.99 * (len(latency) - 1)))],
        "cpu_s_per_gib": {part: s / (nbytes / 1024**3) for part, s in cpu.items()},
        "devices_cpu_s_per_gib": timings[0].get("cpu_s", 0.0) / (nbytes / 1024**3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mib", type=int, default=400)
    parser.add_argument("--fleets", default="1,10,50,100")
    parser.add_argument("--instances", default="1,2")
    parser.add_argument("--down-s", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    fleets = [int(x) for x in args.fleets.split(",")]
    counts = [int(x) for x in args.instances.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="tb-fleet-pg-") as tmp:
        pg = Postgres(Path(tmp)).start() if max(counts) > 1 else None
        try:
            for devices in fleets:
                for instances in counts:
                    results.append(run(devices, instances, args.total_mib, pg))
                    print(json.dumps(results[-1]), flush=True)
            if args.down_s:
                big = max(fleets)
                down = run(big, 1, args.total_mib, pg, down_s=args.down_s)
                print(json.dumps({**down, "ingest_down_s": args.down_s}), flush=True)
        finally:
            if pg is not None:
                pg.remove()
    base = results[0]
    print(f"\nratios to 1 device, 1 instance ({base['mb_s']:.0f} MB/s, broker "
          f"{base['rss_mib']:.0f} MiB, close->complete p50 {base['p50_s']:.2f} s)")  # fmt: skip
    print(f"{'devices':>8} {'inst':>5} {'MB/s':>7} {'thru':>6} {'RSS MiB':>8} {'rss':>6} "
          f"{'p50 s':>6} {'p50':>6} {'p99 s':>6} {'p99':>6}")  # fmt: skip
    for r in results:
        print(
            f"{r['devices']:>8} {r['instances']:>5} {r['mb_s']:>7.0f} "
            f"{r['mb_s'] / base['mb_s']:>5.2f}x {r['rss_mib']:>8.0f} "
            f"{r['rss_mib'] / base['rss_mib']:>5.2f}x {r['p50_s']:>6.2f} "
            f"{r['p50_s'] / base['p50_s']:>5.2f}x {r['p99_s']:>6.2f} "
            f"{r['p99_s'] / base['p99_s']:>5.2f}x"
        )
    if args.down_s:
        print(
            f"ingest down {args.down_s:.0f} s with {max(fleets)} devices: broker peak RSS "
            f"{down['down_rss_mib']:.0f} MiB while down, {down['rss_mib']:.0f} MiB in all"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "down": down if args.down_s else None}))


if __name__ == "__main__":
    main()

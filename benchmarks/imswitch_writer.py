"""What ImSwitch gets from `tilebridge_imswitch.OMEWriter` over the agent's fast path (the
adapter's default edge), against raw paho QoS 1 of the same bytes through the same broker,
in the same run.

Per repetition, alternating A/B: A) raw paho QoS 1 publish -> subscribe (subscriber in its
own process) of the scan's bytes in 1 MiB chunks; B) the scan written the way ImSwitch's
normal mode writes it (one writer, a 4 x 4 grid, 8 MiB frames, `save_frame_ome`'s metadata),
timed from the first `write_frame` to the server's `complete` ack for the image, through the
real `edge-agent run` program (its fast path, a Unix socket) and `server-ingest` (archive).
The ratio is raw seconds / adapter seconds (1.0: as fast as raw). Also `write_frame`'s
latency: with `--live-zarr` the agent writes ImSwitch's Zarr store too, the live target,
which a frame's answer waits for (what ImSwitch's live view needs); without, the server
stream only.

    .venv/bin/python benchmarks/imswitch_writer.py [--reps 5] [--grid 4] [--live-zarr]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import raw_baseline
from devtools.broker import Mosquitto
from devtools.stack import Watcher, agent_program, ingest_program, wait_for, wait_ingest_online
from edge_agent.fastpath_client import FastPathClient
from tilebridge_imswitch import OMEWriter, OMEWriterConfig, root
from tilebridge_imswitch.settings import AdapterSettings

MiB = 1024 * 1024
TILE = 2048
PIXEL_UM = 0.5


def adapter_scan(
    data: Path, watcher: Watcher, frames: list[np.ndarray[Any, Any]], grid: int, zarr: bool
) -> tuple[float, list[float]]:
    """Seconds from the first write_frame to the `complete` ack; per-frame latencies."""
    step = TILE * PIXEL_UM
    config = OMEWriterConfig(write_zarr=zarr, pixel_size=PIXEL_UM)
    base = data / "ExperimentController" / f"bench_{time.monotonic_ns()}"
    base.parent.mkdir(parents=True, exist_ok=True)
    writer = OMEWriter(str(base), (TILE, TILE), (grid, grid), (0.0, 0.0, step, step), config)
    latencies = []
    start = time.perf_counter()
    n = 0
    for iy in range(grid):
        for i in range(grid):
            ix = grid - 1 - i if iy % 2 else i  # a snake, as ImSwitch scans
            meta = {"x": ix * step, "y": iy * step, "z": 0.0, "tile_index": n,
                    "time_index": 0, "z_index": 0, "channel_index": 0,
                    "illuminationChannel": "LED", "runningNumber": n}  # fmt: skip
            frame = frames[n % len(frames)].copy()  # ImSwitch copies each frame too
            t0 = time.perf_counter()
            writer.write_frame(frame, meta)
            latencies.append(time.perf_counter() - t0)
            n += 1
    writer.finalize()
    [image_id] = writer.image_ids

    def complete() -> bool:
        return any(
            a.get("kind") == "image" and a.get("image_id") == str(image_id)
            and a.get("state") == "complete"
            for a in watcher.all("/ack")
        )  # fmt: skip

    wait_for(complete, 600, "the complete ack", interval=0.01)
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--live-zarr", action="store_true", help="also write the live Zarr")
    args = parser.parse_args()
    total = args.grid * args.grid * TILE * TILE * 2
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 4000, (TILE, TILE), dtype=np.uint16) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        work = Path(tmp)
        ingest = ingest_program(broker, work).start("run")
        socket = work / "acquire.sock"
        agent = agent_program(
            broker, work, local_socket=str(socket), local_output_root=str(work)
        ).start("run")
        watcher = Watcher(broker, "tilebridge/v1/#")
        try:
            wait_ingest_online(watcher)
            wait_for(lambda: _answers(socket), 60, "the agent's fast path")
            root.configure(AdapterSettings(edge_socket=socket, finalize_grace_s=0.0))
            ratios, raw_s, ours_s, latencies = [], [], [], []
            for _ in range(args.reps):
                raw = total / (raw_baseline(broker, total, MiB) * 1e6)
                ours, lat = adapter_scan(work / "data", watcher, frames, args.grid, args.live_zarr)
                raw_s.append(raw)
                ours_s.append(ours)
                latencies += lat
                ratios.append(raw / ours)
        finally:
            root.close()
            watcher.close()
            agent.stop()
            ingest.stop()
    lat_ms = sorted(x * 1000 for x in latencies)
    report = {
        "scan": f"{args.grid}x{args.grid} frames of {TILE}x{TILE} uint16 "
        f"({total / MiB:.0f} MiB) over the fast path, live zarr "
        f"{'on' if args.live_zarr else 'off'}",
        "write_frame_samples": len(lat_ms),
        "raw_s": [round(x, 2) for x in raw_s],
        "adapter_s": [round(x, 2) for x in ours_s],
        "ratio_min_median_max": [
            round(min(ratios), 2),
            round(statistics.median(ratios), 2),
            round(max(ratios), 2),
        ],
        "write_frame_ms_p50_p99_max": [
            round(statistics.median(lat_ms), 1),
            round(lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))], 1),
            round(lat_ms[-1], 1),
        ],
    }
    print(json.dumps(report, indent=2))


def _answers(socket: Path) -> bool:
    try:
        with FastPathClient(socket, timeout=2) as client:
            return bool(client.status().device)
    except Exception:
        return False


if __name__ == "__main__":
    main()

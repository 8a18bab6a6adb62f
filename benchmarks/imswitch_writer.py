"""What ImSwitch gets from `tilebridge_imswitch.OMEWriter` over today's HTTP edge, against raw
paho QoS 1 of the same bytes through the same broker, in the same run.

Per repetition, alternating A/B: A) raw paho QoS 1 publish -> subscribe (subscriber in its
own process) of the scan's bytes in 1 MiB chunks; B) the scan written the way ImSwitch's
normal mode writes it (one writer, a 4 x 4 grid, 8 MiB frames, `save_frame_ome`'s metadata),
timed from the first `write_frame` to the server's `complete` ack for the image, through the
real `edge-agent run` program (HTTP API) and `server-ingest` (archive). The ratio is
raw seconds / adapter seconds (1.0: as fast as raw). Also `write_frame`'s latency.

    .venv/bin/python benchmarks/imswitch_writer.py [--reps 5] [--grid 4] [--local-zarr]
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
from devtools.broker import Mosquitto, free_port
from devtools.stack import Watcher, agent_program, ingest_program, wait_for, wait_ingest_online
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
    parser.add_argument("--local-zarr", action="store_true", help="also write the live Zarr")
    args = parser.parse_args()
    total = args.grid * args.grid * TILE * TILE * 2
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 4000, (TILE, TILE), dtype=np.uint16) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        work = Path(tmp)
        ingest = ingest_program(broker, work).start("run")
        port = free_port()
        agent = agent_program(broker, work, http_port=port, local_output_root=str(work)).start(
            "run"
        )
        watcher = Watcher(broker, "tilebridge/v1/#")
        try:
            wait_ingest_online(watcher)
            url = f"http://127.0.0.1:{port}"
            root.configure(AdapterSettings(edge_url=url, finalize_grace_s=0.0))
            wait_for(lambda: _answers(url), 60, "the agent's HTTP API")
            ratios, raw_s, ours_s, latencies = [], [], [], []
            for _ in range(args.reps):
                raw = total / (raw_baseline(broker, total, MiB) * 1e6)
                ours, lat = adapter_scan(work / "data", watcher, frames, args.grid, args.local_zarr)
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
        f"({total / MiB:.0f} MiB), live zarr {'on' if args.local_zarr else 'off'}",
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


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/status", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()

"""What the acquisition-facing edge costs and what wire compression buys.

1. `Acquisition.write_frame` latency (p50 / p99 / max) with every target on (OME-TIFF,
   OME-Zarr, stitched TIFF, the server stream) for 8 MiB frames (2048 x 2048 uint16), against
   a real Mosquitto and an in-process ingest; and how long the local backends then need.
2. zstd on realistic frames (edge_agent.simulate): compression ratio and encode speed of the
   chunks as sent, and the publish throughput (tile bytes committed by the server per second)
   raw versus zstd, uncapped on loopback and under a bandwidth cap, in the same run.

    .venv/bin/python benchmarks/edge_writer.py [--frames 25] [--cap-mbps 100]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

# Run as a script from anywhere: devtools is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.broker import Mosquitto
from edge_agent.app import EdgeApp
from edge_agent.models import ExperimentSpec
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings
from tilebridge_protocol.framing import Codec, encode_tile
from tilebridge_protocol.keys import TileKey
from tilebridge_runtime.mqtt import BrokerSettings

MiB = 1024 * 1024
TILE = 2048
_ID = UUID(int=7)


def spec(scan: SyntheticScan, name: str) -> dict[str, Any]:
    step = scan.step_px * scan.pixel_um
    return {
        "experiment": name, "tile_width": scan.tile_size, "tile_height": scan.tile_size,
        "pixel_size_um": scan.pixel_um,
        "grid": {"columns": scan.columns, "rows": scan.rows, "x_step_um": step, "y_step_um": step},
    }  # fmt: skip


def distinct_frames(scan: SyntheticScan, count: int) -> list[np.ndarray[Any, Any]]:
    """A few real frames, reused round robin (generating one takes ~0.5 s)."""
    return [scan.frame(TileKey(i)) for i in range(count)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench_write_frame(root: Path, broker: BrokerSettings, frames: int, local: bool) -> None:
    side = int(np.ceil(np.sqrt(frames)))
    scan = SyntheticScan(columns=side, rows=side, tile_size=TILE)
    pool = distinct_frames(scan, 4)
    tag = "all" if local else "server"
    settings = AgentSettings(broker=broker, spool_dir=root / f"spool-{tag}", min_free_bytes=0)
    with EdgeApp(settings.model_copy(update={"local_output_root": root})) as agent:
        agent.config.update({
            "write_tiff": local, "write_zarr": local, "write_stitched_tiff": local,
            "write_omero": True, "output_dir": str(root / "out"),
            "max_bytes_in_flight": 256 * MiB,
        })  # fmt: skip
        door = agent.acquisition
        started = door.start(ExperimentSpec.model_validate(spec(scan, f"bench-{tag}")))
        manifest = agent.spool.manifest(started.image_id)
        latencies = []
        start = time.perf_counter()
        for n, key in enumerate(manifest.tile_keys()):
            t0 = time.perf_counter()
            door.write_frame(manifest.image_id, pool[n % len(pool)], tile_index=key.index)
            latencies.append((time.perf_counter() - t0) * 1000)
        acquired = time.perf_counter() - start
        finishing = threading.Thread(target=door.finalize, args=(manifest.image_id,))
        finishing.start()
        finished: dict[str, float] = {}
        targets = len(started.spec.targets or []) + 1
        while len(finished) < targets:
            progress = door.experiment(manifest.image_id)
            for name, target in progress.backends.items():
                if target.state != "writing" and name not in finished:
                    finished[name] = time.perf_counter() - start
            time.sleep(0.05)
        finishing.join()
    label = "all four targets on" if local else "server stream only (the disk buffer)"
    print(f"\n== write_frame, {label}: {len(latencies)} frames of 8 MiB ==")
    print(
        f"write_frame ms: p50 {pct(latencies, 50):.1f}  p99 {pct(latencies, 99):.1f}  "
        f"max {max(latencies):.1f}  mean {statistics.fmean(latencies):.1f}"
    )
    mb = len(latencies) * manifest.tile_bytes / 1e6
    print(f"acquisition side done after {acquired:.2f} s ({mb / acquired:.0f} MB/s offered)")
    print("each target done after (s): " + ", ".join(f"{n} {t:.1f}" for n, t in finished.items()))


def compression_figures(pool: list[np.ndarray[Any, Any]]) -> float:
    raw = wire = 0
    start = time.perf_counter()
    for n, frame in enumerate(pool):
        data = frame.tobytes()
        raw += len(data)
        wire += sum(len(m) for m in encode_tile(_ID, TileKey(n), data, MiB, Codec.ZSTD))
    elapsed = time.perf_counter() - start
    print("\n== zstd (level 1, per 1 MiB chunk) on simulated fluorescence frames ==")
    print(f"ratio raw/wire: {raw / wire:.2f}  ({raw / MiB:.0f} MiB -> {wire / MiB:.1f} MiB)")
    print(f"encode speed (one core, incl. checksums): {raw / elapsed / 1e6:.0f} MB/s")
    return raw / wire


def publish_throughput(
    root: Path, broker: BrokerSettings, codec: Codec, cap: int | None, tiles: int, tag: str
) -> float:
    """Tile bytes the server committed per second (from the first frame to the last ack)."""
    scan = SyntheticScan(columns=tiles, rows=1, tile_size=TILE)
    pool = distinct_frames(scan, 4)
    settings = AgentSettings(
        broker=broker, spool_dir=root / f"spool-{tag}", min_free_bytes=0, codec=codec,
        bandwidth_limit_bytes_per_s=cap,
    )  # fmt: skip
    with EdgeApp(settings) as agent:
        door = agent.acquisition
        started = door.start(
            ExperimentSpec.model_validate(spec(scan, f"bench-{tag}") | {"targets": []})
        )
        manifest = agent.spool.manifest(started.image_id)
        start = time.perf_counter()
        for n, key in enumerate(manifest.tile_keys()):
            door.write_frame(manifest.image_id, pool[n % len(pool)], tile_index=key.index)
        door.finalize(manifest.image_id)
        progress = door.wait_done(manifest.image_id, 600)
        if progress.server != "complete":
            raise TimeoutError(f"{tag}: not complete")
        elapsed = time.perf_counter() - start
    return tiles * manifest.tile_bytes / elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=25, help="frames for the latency run")
    parser.add_argument("--tiles", type=int, default=16, help="tiles per throughput run")
    parser.add_argument("--cap-mbps", type=float, default=100.0, help="bandwidth cap run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    with Mosquitto(root / "broker") as mosquitto:
        broker = BrokerSettings(port=mosquitto.port)
        ingest = IngestService(IngestSettings(broker=broker, data_dir=root / "ingest")).start()
        try:
            bench_write_frame(root, broker, args.frames, local=False)
            bench_write_frame(root, broker, args.frames, local=True)
            ratio = compression_figures(distinct_frames(SyntheticScan(tile_size=TILE), 4))
            cap = round(args.cap_mbps * 1e6 / 8)
            print("\n== publish throughput, tile MB/s committed by the server ==")
            for label, limit in (("loopback, no cap", None), (f"cap {args.cap_mbps:g} Mbps", cap)):
                # Short uncapped runs are noisy: alternate the codecs, report the medians.
                tiles, repeats = (args.tiles, 3) if limit is None else (max(4, args.tiles // 2), 1)
                rates: dict[Codec, list[float]] = {Codec.RAW: [], Codec.ZSTD: []}
                for n in range(repeats):
                    for codec, measured in rates.items():
                        tag = f"{codec.name}-{'cap' if limit else 'free'}-{n}"
                        measured.append(publish_throughput(root, broker, codec, limit, tiles, tag))
                raw, zst = (statistics.median(rates[c]) for c in (Codec.RAW, Codec.ZSTD))
                print(
                    f"{label:<18} raw {raw:7.1f}  zstd {zst:7.1f}  gain x{zst / raw:.2f}"
                    f"  (ratio {ratio:.2f})"
                )
        finally:
            ingest.stop()
            if not os.environ.get("TB_BENCH_KEEP"):
                shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

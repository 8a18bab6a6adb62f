"""Committed throughput of this tree's `server-ingest` against another tree's (A/B, same run).

Each repetition, through one Mosquitto from the repository's config: the raw paho QoS 1
baseline, then the same pre-buffered backlog drained (first publish to last `committed` ack)
into the baseline tree's ingest and into this tree's, in alternating order. The edge agent
is this tree's in both. Prints min/median/max of each, and of tilebridge/raw for both.

  git archive <commit> | tar -x -C /tmp/baseline
  python benchmarks/ingest_ab.py /tmp/baseline [--runs 5] [--tiles 32] [--chunk 1048576]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from benchmarks.throughput import raw_baseline, scan_manifest, tilebridge_drain
from devtools.broker import Mosquitto

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("baseline", type=Path, help="a source tree of the code to compare with")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tiles", type=int, default=32, help="8 MiB tiles per drain")
    parser.add_argument("--chunk", type=int, default=1024 * 1024)
    args = parser.parse_args()
    manifest, frames = scan_manifest(args.tiles)
    total = args.tiles * manifest.tile_bytes
    results: dict[str, list[float]] = {"raw": [], "baseline": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for run in range(args.runs):
            with Mosquitto(work / f"broker-{run}") as broker:
                results["raw"].append(raw_baseline(broker, total, args.chunk))
                order = ["baseline", "this"] if run % 2 == 0 else ["this", "baseline"]
                for which in order:
                    env = os.environ.pop("PYTHONPATH", None)
                    if which == "baseline":  # the baseline tree's packages come first
                        os.environ["PYTHONPATH"] = str(args.baseline.resolve())
                    try:
                        mbs = tilebridge_drain(
                            broker, work / f"{which}-{run}", args.chunk, manifest, frames
                        )
                    finally:
                        os.environ.pop("PYTHONPATH", None)
                        if env is not None:
                            os.environ["PYTHONPATH"] = env
                    results[which].append(mbs)
            console.print(", ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in results.items()))
    table = Table(
        title=f"{total >> 20} MiB of 8 MiB tiles, {args.chunk >> 10} KiB chunks, {args.runs} runs"
    )
    for column in ("", "min", "median", "max"):
        table.add_column(column, justify="right")
    rows = {
        "raw paho MB/s": results["raw"],
        "baseline MB/s": results["baseline"],
        "this tree MB/s": results["this"],
        "baseline / raw": [b / r for b, r in zip(results["baseline"], results["raw"], strict=True)],
        "this / raw": [t / r for t, r in zip(results["this"], results["raw"], strict=True)],
        "this / baseline": [
            t / b for t, b in zip(results["this"], results["baseline"], strict=True)
        ],
    }
    for name, values in rows.items():
        table.add_row(name, *(f"{f(values):.2f}" for f in (min, statistics.median, max)))
    console.print(table)


if __name__ == "__main__":
    main()

"""`make demo`: a simulated tile scan flows edge -> Mosquitto -> ingest -> local archive.

Starts Mosquitto from the repo's config on a free port, the ingest and the edge agent as the
real console programs, runs a 4 x 4 scan of 2048 x 2048 uint16 frames with progress bars,
then reads the stored image back and checks every tile against the acquired one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from rich.console import Console
from rich.table import Table

from devtools.broker import Mosquitto
from devtools.stack import Watcher, agent_program, ingest_program, wait_ingest_online
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.topics import INGEST_STATUS_FILTER

REPO = Path(__file__).resolve().parents[1]
console = Console()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO / "demo-data")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=2048)
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    scan = SyntheticScan(columns=args.columns, rows=args.rows, tile_size=args.tile_size)
    manifest = scan.manifest()

    console.rule("tilebridge demo: edge -> broker -> ingest -> archive")
    with Mosquitto(args.workdir / "broker") as broker:
        console.print(f"Mosquitto on 127.0.0.1:{broker.port} (config: mosquitto/tilebridge.conf)")
        watcher = Watcher(broker, INGEST_STATUS_FILTER)
        ingest = ingest_program(broker, args.workdir).start("run")
        try:
            wait_ingest_online(watcher)
        except TimeoutError:
            console.print(f"[red]server-ingest did not come up[/red]\n{ingest.log_tail()}")
            return 1
        finally:
            watcher.close()
        console.print(f"server-ingest running (data: {args.workdir / 'ingest'})")
        agent = agent_program(broker, args.workdir)
        summary_path = args.workdir / "summary.json"
        started = time.monotonic()
        agent.start(
            "simulate", "--columns", str(args.columns), "--rows", str(args.rows),
            "--tile-size", str(args.tile_size), "--summary", str(summary_path),
            stderr_to_log=False,
        )  # fmt: skip
        code = agent.wait(timeout=900)
        elapsed = time.monotonic() - started
        ingest.stop()
    if code != 0 or not summary_path.exists():
        console.print(f"[red]the simulated acquisition failed (exit {code})[/red]")
        console.print(ingest.log_tail())
        return 1
    summary = json.loads(summary_path.read_text())
    archive = Path(summary["locations"]["archive"])
    intact, total = verify(archive, scan)
    table = Table(title="demo summary", show_header=False)
    table.add_row("image", f"{manifest.image_id} ({manifest.image_name})")
    table.add_row("frames", f"{manifest.tile_count} x {scan.tile_size}x{scan.tile_size} uint16")
    megabytes = manifest.tile_count * manifest.tile_bytes / 1e6
    table.add_row(
        "moved", f"{megabytes:.0f} MB in {elapsed:.1f} s (incl. acquisition and start-up)"
    )
    table.add_row("stored at", str(archive))
    table.add_row("check", f"{intact}/{total} tiles equal to the acquired frames")
    console.print(table)
    if intact != total:
        console.print("[red]some tiles differ from what was acquired[/red]")
        return 1
    console.print(f"[green]every tile arrived intact ({intact}/{total})[/green]")
    return 0


def verify(archive: Path, scan: SyntheticScan) -> tuple[int, int]:
    """Read the archive with tifffile and compare each tile with a freshly generated frame."""
    manifest = scan.manifest()
    intact = 0
    with tifffile.TiffFile(archive) as tif:
        for position, series in zip(manifest.positions, tif.series, strict=True):
            data = series.asarray().reshape(
                manifest.size_t, manifest.size_c, manifest.size_z,
                manifest.tile_height, manifest.tile_width,
            )  # fmt: skip
            for t in range(manifest.size_t):
                for c in range(manifest.size_c):
                    for z in range(manifest.size_z):
                        expected = scan.frame(TileKey(position.index, z, c, t))
                        intact += bool(np.array_equal(data[t, c, z], expected))
    return intact, manifest.tile_count


if __name__ == "__main__":
    sys.exit(main())

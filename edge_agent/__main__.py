"""`edge-agent`: the service on the microscope's Pi, and a simulated scan for demos and tests."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_agent.agent import EdgeAgent
from edge_agent.api import FrameMetadata, TileScanWriter
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.errors import TilebridgeError
from tilebridge_protocol.messages import ImageState
from tilebridge_runtime.process import exit_when_a_thread_dies

console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="JSON settings file (see deploy/edge.example.json)"
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the agent until stopped (the systemd service)")
    status = commands.add_parser("status", help="show the running agent's progress (HTTP API)")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--url", help="the agent's HTTP API (default: from the settings)")
    sim = commands.add_parser("simulate", help="acquire a synthetic tile scan through the agent")
    sim.add_argument("--columns", type=int, default=4)
    sim.add_argument("--rows", type=int, default=4)
    sim.add_argument("--tile-size", type=int, default=2048)
    sim.add_argument("--channels", type=int, default=1)
    sim.add_argument("--z-planes", type=int, default=1)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--image-id", type=UUID, help="resume or repeat this image")
    sim.add_argument("--frame-delay", type=float, default=0.0, help="seconds between frames")
    sim.add_argument("--timeout", type=float, default=600.0, help="wait this long for the server")
    sim.add_argument("--no-wait", action="store_true", help="exit once every frame is buffered")
    sim.add_argument("--summary", type=Path, help="write a JSON summary here")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(threadName)s %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    try:
        settings = AgentSettings.load(args.config)
    except (ValueError, OSError) as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        return 2
    if args.command == "run":
        try:
            return run(settings)
        except TilebridgeError as exc:
            console.print(f"[red]cannot run:[/red] {exc}")
            return 2
    if args.command == "status":
        from edge_agent.client import show_status

        return show_status(settings, watch=args.watch, url=args.url)
    scan = SyntheticScan(
        columns=args.columns, rows=args.rows, tile_size=args.tile_size, channels=args.channels,
        z_planes=args.z_planes, seed=args.seed, image_id=args.image_id,
    )  # fmt: skip
    return simulate(settings, scan, args)


def run(settings: AgentSettings) -> int:
    exit_when_a_thread_dies()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EdgeAgent(settings) as agent:
        if settings.http_port is not None:
            from edge_agent.http import serve_http

            serve_http(agent, settings, stop)
        stop.wait()
    return 0


def simulate(settings: AgentSettings, scan: SyntheticScan, args: argparse.Namespace) -> int:
    manifest = scan.manifest()
    keys = manifest.tile_keys()
    console.print(
        f"simulating image {manifest.image_id}: {len(keys)} frames of "
        f"{scan.tile_size}x{scan.tile_size} uint16 from device {settings.device_id}"
    )
    summary: dict[str, object] = {"image_id": str(manifest.image_id), "frames": len(keys)}
    with EdgeAgent(settings) as agent, Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    ) as progress:  # fmt: skip
        acquired = progress.add_task("acquired", total=len(keys))
        committed = progress.add_task("committed", total=len(keys))
        writer = TileScanWriter(agent, manifest)
        start_committed = agent.publisher.counters.committed_tiles
        try:
            for key in keys:
                pos = manifest.positions[key.index]
                writer.write_frame(
                    scan.frame(key),
                    FrameMetadata(tile_index=key.index, z=key.z, c=key.c, t=key.t,
                                  x_um=pos.x_um, y_um=pos.y_um),
                )  # fmt: skip
                progress.advance(acquired)
                progress.update(
                    committed, completed=agent.publisher.counters.committed_tiles - start_committed
                )
                if args.frame_delay:
                    time.sleep(args.frame_delay)
            writer.finalize()
        except TilebridgeError as exc:
            console.print(f"[red]acquisition failed:[/red] {exc}")
            return 1
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        result = None
        while time.monotonic() < deadline and result is None:
            result = agent.wait_done([manifest.image_id], 0.5).get(manifest.image_id)
            done = agent.publisher.counters.committed_tiles - start_committed
            progress.update(committed, completed=len(keys) if result else done)
    if result is None:
        console.print(f"[red]no answer from the server within {args.timeout:.0f} s[/red]")
        return 1
    summary.update(state=result.state.value, locations=result.locations)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    if result.state is not ImageState.COMPLETE:
        console.print(
            f"[red]the server could not store the image:[/red] {result.reason} {result.detail}"
        )
        return 1
    console.print(f"image {manifest.image_id} stored: {result.locations}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

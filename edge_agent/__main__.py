"""`edge-agent`: the service on the microscope's Pi, and a simulated scan for demos and tests."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_agent.app import EdgeApp
from edge_agent.frontdoor import FrontDoor
from edge_agent.models import ExperimentSpec, FrameInfo
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.errors import TilebridgeError
from tilebridge_protocol.keys import TileKey
from tilebridge_runtime.logs import setup_logging
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
    sim.add_argument("--frames", type=int, help="write only this many frames, then stop")
    sim.add_argument("--partial", action="store_true", help="finalize with the frames written")
    sim.add_argument(
        "--fast-path", action="store_true", help="acquire through a running agent's socket"
    )
    experiments = commands.add_parser(
        "experiments", help="list or end the running agent's experiments (fast path)"
    )
    what = experiments.add_subparsers(dest="what", required=True)
    what.add_parser("list", help="every experiment the agent holds")
    end = what.add_parser("finalize", help="close an experiment")
    end.add_argument("image_id", type=UUID)
    end.add_argument("--partial", action="store_true", help="with the frames it has")
    stop = what.add_parser("abort", help="discard an experiment on the Pi")
    stop.add_argument("image_id", type=UUID)
    rejected = commands.add_parser(
        "rejected", help="tiles the server refused, set aside on the Pi: list or send again"
    )
    aside = rejected.add_subparsers(dest="what", required=True)
    aside.add_parser("list", help="images with tiles set aside")
    again = aside.add_parser("resend", help="queue an image's set-aside tiles again")
    again.add_argument("image_id", type=UUID)
    args = parser.parse_args(argv)

    setup_logging(args.log_level)
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
    if args.command == "experiments":
        from edge_agent.cli import experiments_command

        return experiments_command(settings, args)
    if args.command == "rejected":
        from edge_agent.cli import rejected_command

        return rejected_command(settings, args)
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
    with EdgeApp(settings) as app:
        http = None
        if settings.http_port is not None:
            from edge_agent.http import serve

            http = serve(app)
        stop.wait()
        if http is not None:
            http.should_exit = True
    return 0


def simulate(settings: AgentSettings, scan: SyntheticScan, args: argparse.Namespace) -> int:
    manifest = scan.manifest()
    keys = manifest.tile_keys()[: args.frames] if args.frames else manifest.tile_keys()
    console.print(
        f"simulating image {manifest.image_id}: {len(keys)} frames of "
        f"{scan.tile_size}x{scan.tile_size} uint16 from device {settings.device_id}"
    )
    summary: dict[str, object] = {"image_id": str(manifest.image_id), "frames": len(keys)}
    spec = ExperimentSpec.from_manifest(manifest, targets=[], server=True)
    if args.fast_path:
        from edge_agent.fastpath_client import FastPathClient

        return _acquire(FastPathClient(settings.socket_path), scan, spec, keys, summary, args)
    with EdgeApp(settings.model_copy(update={"fast_path": False})) as app:
        return _acquire(app.acquisition, scan, spec, keys, summary, args)


def _acquire(
    door: FrontDoor,
    scan: SyntheticScan,
    spec: ExperimentSpec,
    keys: list[TileKey],
    summary: dict[str, object],
    args: argparse.Namespace,
) -> int:
    manifest = scan.manifest()
    with Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    ) as progress:  # fmt: skip
        acquired = progress.add_task("acquired", total=len(keys))
        committed = progress.add_task("committed", total=len(keys))
        try:
            door.start(spec)
            for key in keys:
                pos = manifest.positions[key.index]
                info = FrameInfo.at(key, x_um=pos.x_um, y_um=pos.y_um)
                door.write_frame(manifest.image_id, scan.frame(key), info)
                progress.advance(acquired)
                if args.frame_delay:
                    time.sleep(args.frame_delay)
            if args.frames is None or args.partial:
                door.finalize(manifest.image_id, partial=args.partial)
        except TilebridgeError as exc:
            console.print(f"[red]acquisition failed:[/red] {exc}")
            return 1
        if args.no_wait or (args.frames is not None and not args.partial):
            return 0
        deadline = time.monotonic() + args.timeout
        state = door.experiment(manifest.image_id)
        while time.monotonic() < deadline and state.server == "sending":
            time.sleep(0.2)
            state = door.experiment(manifest.image_id)
            progress.update(committed, completed=state.backends["omero"].frames_written)
    omero = state.backends["omero"]
    if state.server == "sending":
        console.print(f"[red]no answer from the server within {args.timeout:.0f} s[/red]")
        return 1
    summary.update(state=state.server, locations=state.locations, partial=state.partial)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2))
    if state.server != "complete":
        console.print(f"[red]the server could not store the image:[/red] {omero.error}")
        return 1
    console.print(f"image {manifest.image_id} stored: {omero.location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

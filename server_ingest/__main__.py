"""`server-ingest`: runs next to OMERO, turns device messages into stored images."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console

from server_ingest import admin, images
from server_ingest.app import IngestService
from server_ingest.deadletters import dead_letters
from server_ingest.settings import IngestSettings
from tilebridge_protocol.errors import TilebridgeError
from tilebridge_runtime.logs import setup_logging
from tilebridge_runtime.process import exit_when_a_thread_dies

console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="server-ingest", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="JSON settings file (see deploy/ingest.example.json)"
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the ingest until stopped (the systemd service)")
    admin.add_parser(commands)
    images.add_parser(commands)
    commands.add_parser(
        "dashboard", help="serve the monitoring dashboard (--config: deploy/dashboard.example.json)"
    )
    letters = commands.add_parser(
        "dead-letters", help="list the messages the ingest failed on (newest first)"
    )
    letters.add_argument("--limit", type=int, default=100)
    letters.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.command == "device":
        args.settings = _settings_or_none(args.config)
        return admin.main(args)
    if args.command == "dashboard":
        from server_ingest.dashboard.server import main as dashboard

        return dashboard(args.config)
    try:
        settings = IngestSettings.load(args.config)
    except (ValueError, OSError) as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        return 2
    if args.command == "dead-letters":
        images.become_owner(settings.data_dir)
        print(dead_letters(settings, args.limit, args.json))
        return 0
    if args.command == "images":
        return images.main(args, settings)
    return run(settings)


def _settings_or_none(config: Path | None) -> IngestSettings | None:
    """The ingest's settings for `device` commands, which work without them too."""
    try:
        return IngestSettings.load(config)
    except (ValueError, OSError):
        return None


def run(settings: IngestSettings) -> int:
    exit_when_a_thread_dies()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        service = IngestService(settings)
    except TilebridgeError as exc:
        console.print(f"[red]cannot start:[/red] {exc}")
        return 2
    with service:
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

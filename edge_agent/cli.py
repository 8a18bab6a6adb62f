"""`edge-agent experiments list|finalize [--partial]|abort`: end an experiment the
acquisition program left open, on the running agent (over its fast-path socket)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from edge_agent.fastpath_client import FastPathClient
from edge_agent.settings import AgentSettings
from tilebridge_protocol.errors import TilebridgeError


def experiments_command(settings: AgentSettings, args: argparse.Namespace) -> int:
    console = Console()
    try:
        with FastPathClient(settings.socket_path, timeout=30) as client:
            if args.what == "list":
                table = Table(title=f"experiments on {settings.device_id}")
                for column in ("image_id", "experiment", "state", "frames", "server", "ended by"):
                    table.add_column(column)
                for e in client.experiments():
                    state = e.state + (" (partial)" if e.partial else "")
                    table.add_row(str(e.image_id), e.experiment, state,
                                  f"{e.frames_received}/{e.frames_total}", e.server,
                                  e.ended_by or "")  # fmt: skip
                console.print(table)
                return 0
            if args.what == "finalize":
                progress = client.finalize(args.image_id, partial=args.partial, timeout=0)
            else:
                progress = client.abort(args.image_id)
    except TilebridgeError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    console.print(
        f"{progress.image_id}: {progress.state}{' (partial)' if progress.partial else ''}, "
        f"{progress.frames_received}/{progress.frames_total} frames, server {progress.server}"
    )
    return 0

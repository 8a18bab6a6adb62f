"""`edge-agent experiments list|finalize [--partial]|abort`: end an experiment the
acquisition program left open, on the running agent (over its fast-path socket).
`edge-agent rejected list|resend`: the tiles the server refused for good, set aside in
`spool/rejected/`; `resend` queues them again once the cause is fixed on the server (with
the agent stopped: it works on the spool itself)."""

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


def rejected_command(settings: AgentSettings, args: argparse.Namespace) -> int:
    from uuid import UUID

    from edge_agent.spool import Spool

    console = Console()
    if args.what == "resend" and settings.socket_path.exists():
        try:
            with FastPathClient(settings.socket_path, timeout=5) as client:
                client.experiments()
            console.print(
                "[red]the agent is running: stop it first (sudo systemctl stop tilebridge-edge),"
                " resend, then start it again[/red]"
            )
            return 1
        except (TilebridgeError, OSError):
            pass  # a socket file left by an agent that is gone
    spool = Spool(settings.spool_dir)
    try:
        if args.what == "list":
            for image_id, count, detail in spool.rejected():
                console.print(f"{image_id}  {count} tiles set aside  {detail or ''}")
            return 0
        image_id = UUID(str(args.image_id))
        sent = spool.resend_rejected(image_id)
    finally:
        spool.close()
    if not sent:
        console.print(f"[red]no tiles of {image_id} are set aside in {spool.rejected_dir}[/red]")
        return 1
    console.print(f"{image_id}: {sent} tiles queued again; start the agent to send them")
    return 0

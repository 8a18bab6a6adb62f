"""`python -m devtools.chaos`: one seeded chaos run; exit 0 only if every image is complete.

Exit status: 0 pass, 1 something lost, duplicated, corrupted, incomplete or orphaned, 2 the
run itself could not go on. The report is printed and written to `<workdir>/report.json`;
the programs' logs are kept in `<workdir>/logs/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from devtools.chaos.logdigest import log_digest, render_logs
from devtools.chaos.plan import FAULT_KINDS
from devtools.chaos.report import render, summarize, to_json
from devtools.chaos.runner import Options, Runner


def main(argv: list[str] | None = None) -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m devtools.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--faults", type=int, default=defaults.faults)
    parser.add_argument("--scans", type=int, default=defaults.scans)
    parser.add_argument(
        "--minutes",
        type=float,
        default=defaults.minutes,
        help="bound on the fault and acquisition phase",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=defaults.drain_s,
        help="longest wait for the images to finish afterwards",
    )
    parser.add_argument(
        "--kinds", help=f"comma-separated fault kinds (default: all of {', '.join(FAULT_KINDS)})"
    )
    parser.add_argument("--workdir", type=Path, default=defaults.workdir)
    parser.add_argument("--quiet", action="store_true", help="do not print the timeline")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else None
    options = Options(
        seed=args.seed,
        faults=args.faults,
        scans=args.scans,
        minutes=args.minutes,
        drain_s=args.drain_s,
        kinds=kinds or defaults.kinds,
        workdir=args.workdir,
        echo=not args.quiet,
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # a log file or a pipe: room for the tables
    try:
        runner = Runner(options)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    try:
        outcome = runner.run()
    except Exception:
        outcome = runner.outcome
    summary = summarize(outcome)
    logs = log_digest(options.workdir / "logs")
    (options.workdir / "report.json").write_text(
        json.dumps(to_json(outcome, summary, logs), indent=2, default=str)
    )
    console.print(render(outcome, summary))
    if logs:
        console.print(render_logs(logs))
    console.print(f"report: {options.workdir / 'report.json'}, logs: {options.workdir / 'logs'}")
    if outcome.error:
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())

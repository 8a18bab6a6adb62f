"""A digest of the programs' logs: per log, tracebacks, the most frequent ERROR/CRITICAL
messages and the exceptions tracebacks end in, with numbers and ids folded so that repeats
of one problem count as one line. It points at the findings; the verdict never uses it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.table import Table

# A record starts with rich's "[time] LEVEL" (or its blank time column), or with logging's
# "2026-12-01 20:35:10,179 LEVEL"; anything else continues the record above (rich wraps).
_RECORD = re.compile(
    r"^(?:\[[^\]]{17}\]| {19}) (?P<rich>DEBUG|INFO|WARNING|ERROR|CRITICAL) +(?P<a>.*)"
    r"|^\d{4}-\d\d-\d\d [\d:,]+ (?P<std>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<b>.*)"
)
_NOISE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b\d+\b"), "N"),
    (re.compile(r"\s+"), " "),
]


def _records(text: str) -> list[tuple[str, str]]:
    """(level, message with its wrapped continuation lines joined)."""
    records: list[tuple[str, str]] = []
    open_record = False
    for line in text.splitlines():
        match = _RECORD.match(line)
        if match:
            level = match.group("rich") or match.group("std")
            records.append((level, (match.group("a") or match.group("b") or "").strip()))
            open_record = True
        elif open_record and line.startswith(" " * 20):
            if line.strip().startswith("Traceback"):
                open_record = False  # the message is over; its traceback is not folded in
                continue
            level, message = records[-1]
            records[-1] = (level, f"{message} {line.strip()}")
        else:
            open_record = False
    return records


_RAISED = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)(?::.*)?$")


def _fold(message: str) -> str:
    for pattern, replacement in _NOISE:
        message = pattern.sub(replacement, message)
    return message.strip()[:200]


def log_digest(logs_dir: Path, top: int = 8) -> dict[str, Any]:
    """Per program log: tracebacks, its most frequent ERROR/CRITICAL messages and the
    exceptions its tracebacks end in (numbers and ids folded, so repeats of one problem
    count as one line)."""
    digest: dict[str, Any] = {}
    for log in sorted(logs_dir.glob("*.log")):
        text = log.read_text(errors="replace")
        errors: Counter[str] = Counter()
        for level, message in _records(text):
            if level in ("ERROR", "CRITICAL"):
                errors[_fold(message)] += 1
        for line in text.splitlines():
            if _RAISED.match(line):
                errors[f"raised: {_fold(line)}"] += 1
        if errors or "Traceback" in text:
            digest[log.stem] = {
                "tracebacks": text.count("Traceback (most recent call last)"),
                "errors": errors.most_common(top),
            }
    return digest


def render_logs(digest: dict[str, Any]) -> RenderableType:
    table = Table(title="errors in the programs' logs (most frequent first)")
    for column in ("program", "tracebacks", "count", "message"):
        table.add_column(column)
    for program, entry in digest.items():
        first = True
        for message, count in entry["errors"] or [("-", 0)]:
            table.add_row(
                program if first else "",
                str(entry["tracebacks"]) if first else "",
                str(count),
                message,
            )
            first = False
    return table

"""Logging for both services: rich console output on a terminal, plain lines for journald.

Under systemd (or any pipe) every record is ONE line, prefixed with an ISO 8601 UTC time,
the level and the thread, so `journalctl -u tilebridge-ingest | grep` finds whole messages:
a message or traceback that spans lines has its line breaks written as ` | `. On a terminal
the output is rich's, for people.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

LINE_FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """`2026-11-04T09:12:01.532Z WARNING ingest-core server_ingest.core: refused ...`"""

    def __init__(self) -> None:
        super().__init__(LINE_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line for line in super().format(record).splitlines() if line.strip())


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr): rich on a terminal, one ISO-stamped line per record elsewhere."""
    stream = stream or sys.stderr
    handler: logging.Handler
    if stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=stream), show_path=False)
        handler.setFormatter(logging.Formatter("%(threadName)s %(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(OneLineFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])

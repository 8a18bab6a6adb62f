"""The services' log lines off a terminal (issue 13): one line per record, ISO 8601 UTC time,
level, thread and logger first, a traceback kept on the same line."""

from __future__ import annotations

import io
import logging
import re

from tilebridge_runtime.logs import OneLineFormatter, setup_logging

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) MainThread tb\.test: .+$"
)


def test_a_record_with_a_traceback_stays_one_greppable_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter())
    log = logging.getLogger("tb.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.warning("image %s: two\nlines", "scope-1/abc")
        try:
            raise ValueError("bad\ninput")
        except ValueError:
            log.exception("refused")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0].endswith("image scope-1/abc: two | lines")
    assert "refused | Traceback (most recent call last): | " in lines[1]
    assert lines[1].endswith("ValueError: bad | input")


def test_setup_picks_plain_lines_when_not_on_a_terminal() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        stream = io.StringIO()  # not a tty: what systemd's journal gets
        setup_logging("INFO", stream)
        [handler] = root.handlers
        assert isinstance(handler.formatter, OneLineFormatter)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)

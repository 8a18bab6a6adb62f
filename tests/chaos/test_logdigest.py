"""The digest folds repeats of one problem into one line, joins what rich wrapped, and names
the exceptions tracebacks end in."""

from __future__ import annotations

from pathlib import Path

from devtools.chaos.logdigest import log_digest

RICH_LOG = """\
[12/01/26 20:56:50] ERROR    ingest-mqtt chunk from scope-a not staged: staging tile (1, 0, 0, 0) of
                             da260c10-7a86-5469-a999-77ebecd771a6: No space left on device
                    ERROR    ingest-mqtt chunk from scope-a not staged: staging tile (2, 0, 0, 0) of
                             0549722c-ec32-5957-ac07-738f105f2a5a: No space left on device
[12/01/26 20:56:52] ERROR    ingest-mqtt unexpected error on close from scope-b
                             Traceback (most recent call last):
                               File "server_ingest/ledger.py", line 78, in _write
                                 self._db.execute(sql, args)
                             sqlite3.OperationalError: database or disk is full
                    WARNING  ingest-mqtt refused close from scope-b: the ingest failed
                    INFO     ingest-storer-0 image stored
"""
STD_LOG = """\
2026-12-01 20:35:10,179 ERROR Dummy-1 stand-in servant failed
Traceback (most recent call last):
  File "tests/omero_standin/glacier.py", line 131, in destroySession
Glacier2.SessionNotExistException
2026-12-01 20:35:11,002 INFO MainThread fine
"""


def test_repeats_fold_wrapped_lines_join_and_raised_exceptions_are_named(tmp_path: Path) -> None:
    (tmp_path / "ingest.log").write_text(RICH_LOG)
    (tmp_path / "omero-standin.log").write_text(STD_LOG)
    (tmp_path / "quiet.log").write_text("[12/01/26 20:56:50] INFO     all good\n")
    digest = log_digest(tmp_path)
    assert set(digest) == {"ingest", "omero-standin"}
    ingest = dict(digest["ingest"]["errors"])
    assert digest["ingest"]["tracebacks"] == 1
    assert ingest == {
        "ingest-mqtt chunk from scope-a not staged: staging tile (N, N, N, N) of <uuid>: "
        "No space left on device": 2,
        "ingest-mqtt unexpected error on close from scope-b": 1,
        "raised: sqlite3.OperationalError: database or disk is full": 1,
    }
    standin = dict(digest["omero-standin"]["errors"])
    assert standin == {
        "Dummy-N stand-in servant failed": 1,
        "raised: Glacier2.SessionNotExistException": 1,
    }

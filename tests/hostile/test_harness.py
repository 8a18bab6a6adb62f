"""The harness's own checks can fail: a check that never fires would pass every attack."""

from __future__ import annotations

import pytest

from tests.hostile.conftest import GOOD, Hostile, MiB


def test_confinement_flags_writes_outside_the_data_directories(hostile: Hostile) -> None:
    sandbox = hostile.sandbox
    (sandbox.ingest_data / "staging").mkdir(parents=True)
    (sandbox.ingest_data / "staging" / "fine").write_text("inside")
    (sandbox.device_data(GOOD) / "spool").mkdir(parents=True)
    sandbox.allow(sandbox.data / "archive").mkdir()
    (sandbox.data / "archive" / "image.ome.tif").write_text("declared")
    hostile.assert_confined()
    escapes = [
        sandbox.cwd / "relative-write",  # a relative path, resolved in the working directory
        sandbox.bait / "absolute-write",
        sandbox.data / "next-to-the-data",  # `../` out of a data directory
        sandbox.root / "home" / ".cache",
    ]
    for path in escapes:
        path.write_text("escaped")
    (sandbox.root / "tmp" / "link").symlink_to(sandbox.ingest_data)
    with pytest.raises(AssertionError) as failure:
        hostile.assert_confined()
    for path in [*escapes, sandbox.root / "tmp" / "link"]:
        assert str(path) in str(failure.value)
        path.unlink()


def test_a_scan_reports_its_outcome_and_the_sampler_sees_the_ingest(hostile: Hostile) -> None:
    ingest = hostile.start_ingest()
    with hostile.rss(ingest) as rss:
        result = hostile.scan(columns=1, rows=2)
    assert result.ok, result.log
    assert result.summary["frames"] == 2 and result.seconds > 0
    assert len(rss.samples) > 1 and rss.peak > 20 * MiB and not rss.exited
    assert (hostile.status.latest(f"tilebridge/v1/dev/{GOOD}/status") or {}).get("device") == GOOD

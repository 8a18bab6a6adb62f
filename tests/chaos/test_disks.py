"""The disks the disk faults fill are real filesystems: full means ENOSPC for everyone."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from devtools.chaos.disks import MiB, SmallDisk, stale_mounts, unmount_stale
from devtools.chaos.runner import fresh_workdir

pytestmark = pytest.mark.usefixtures("root")


def test_fill_leaves_what_was_asked_and_release_gives_it_back(tmp_path: Path) -> None:
    disk = SmallDisk(tmp_path / "disk", 8 * MiB).mount()
    try:
        (disk.path / "before").write_bytes(bytes(MiB))
        taken = disk.fill(leave=300_000)
        assert 300_000 - 4096 <= disk.free_bytes() <= 300_000 + 4096
        assert 6 * MiB < taken < 7 * MiB
        with pytest.raises(OSError) as full:
            (disk.path / "too-big").write_bytes(bytes(400_000))
        assert full.value.errno == errno.ENOSPC
        disk.fill(leave=0)
        assert disk.free_bytes() == 0
        disk.release()
        assert disk.free_bytes() > 6 * MiB
        assert (disk.path / "before").stat().st_size == MiB
    finally:
        disk.unmount()
    assert not (tmp_path / "disk" / "before").exists()


def test_mounts_a_killed_run_left_behind_are_found_and_removed(tmp_path: Path) -> None:
    left = SmallDisk(tmp_path / "run" / "spool", MiB).mount()
    assert stale_mounts(tmp_path / "run") == [left.path]
    unmount_stale(tmp_path / "run")
    assert stale_mounts(tmp_path / "run") == []


def test_a_workdir_is_cleared_only_if_a_run_made_it(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="refusing to clear"):
        fresh_workdir(precious)
    assert (precious / "thesis.tex").exists()
    run = tmp_path / "run"
    fresh_workdir(run)
    left = SmallDisk(run / "ingest-data", MiB).mount()
    (run / "chaos.log").write_text("an earlier run")
    fresh_workdir(run)
    assert not left.path.exists() and stale_mounts(run) == []
    assert sorted(p.name for p in run.iterdir()) == [".tilebridge-chaos"]

"""Real small filesystems that fill up: a tmpfs mounted for each disk a fault fills.

Filling means what it means on a real machine: the free space of the filesystem goes to (or
near) zero for every process on it, and comes back when the filler file is deleted. Mounting
needs root (or CAP_SYS_ADMIN); `make chaos` runs as root on the development machine.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

FILLER = ".chaos-filler"
MiB = 1024 * 1024


class SmallDisk:
    """A tmpfs of `size` bytes on `path` (the directory a program is given as its disk)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.mounted = False

    @property
    def filler(self) -> Path:
        return self.path / FILLER

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"cannot mount a {self.size // MiB} MiB tmpfs on {self.path} (chaos needs root "
                f"or CAP_SYS_ADMIN): {done.stderr.strip()}"
            )
        self.mounted = True
        return self

    def unmount(self) -> None:
        if self.mounted:
            # Lazy: a program that still holds a file open must not keep the mount alive.
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self, leave: int = 0) -> int:
        """Take all free space but `leave` bytes (rounded to pages); returns bytes taken.

        Others keep writing while this runs, so it allocates in steps until the free space
        is down to `leave` or the filesystem says it is full."""
        taken = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(64):
                want = self.free_bytes() - leave
                if want < 4096:
                    break
                try:
                    os.posix_fallocate(fd, taken, want)
                    taken += want
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    # Someone wrote meanwhile: take half of what is asked and try again.
                    half = (want // 2) & ~4095
                    if half < 4096:
                        break
                    try:
                        os.posix_fallocate(fd, taken, half)
                        taken += half
                    except OSError as again:
                        if again.errno != errno.ENOSPC:
                            raise
        finally:
            os.close(fd)
        return taken

    def release(self) -> None:
        """Give the space back."""
        self.filler.unlink(missing_ok=True)


def stale_mounts(under: Path) -> list[Path]:
    """Mount points below `under` (left by a run that was killed), deepest first."""
    root = str(Path(under).resolve())
    found = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].replace("\\040", " ")
            if point == root or point.startswith(root + os.sep):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_stale(under: Path) -> None:
    for point in stale_mounts(under):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)

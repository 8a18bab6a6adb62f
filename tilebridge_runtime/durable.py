"""Durable file writes: a file is either whole on disk or absent, never half written."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tilebridge_protocol.errors import PermanentError, TransientError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR})
"""Disk faults that pass by themselves (space is freed, the device recovers)."""


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn OS errors into tilebridge's typed errors: a full disk may pass, EACCES will not.

    An OSError without an errno is a short write reported by a library (numpy's `tofile`
    says "262144 requested and 196152 written" when the disk fills): that is a full disk
    too, so it is transient. Only an error the OS names as lasting is permanent."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in what else ""
        if exc.errno is None or exc.errno in TRANSIENT_ERRNOS:
            raise TransientError(f"{what}: {exc.strerror or exc}{where}") from exc
        raise PermanentError(f"{what}: {exc.strerror or exc}{where}") from exc


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to produce the file, fsync it, then rename it into place durably."""
    tmp = path.with_name(f".{path.name}.partial")
    with disk_errors(f"writing {path}"):
        # Inside: an unwritable archive folder must fail naming the path, never as a bare
        # PermissionError (issue 13).
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            if tmp.is_dir():
                for sub in sorted(tmp.rglob("*")):
                    if sub.is_file():
                        fsync_file(sub)
            else:
                fsync_file(tmp)
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            remove(tmp)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class HeldLock:
    """An exclusive `flock` on a file, held until `release()` (or the process ends)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise PermanentError(f"{path} is held by another process (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def is_locked(path: Path) -> bool:
    """Whether another process holds `path`'s lock right now (False if it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

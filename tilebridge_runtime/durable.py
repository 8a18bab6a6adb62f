"""Durable file writes: a file is either whole on disk or absent, never half written."""

from __future__ import annotations

import errno
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
        if exc.errno is None or exc.errno in TRANSIENT_ERRNOS:
            raise TransientError(f"{what}: {exc.strerror or exc}") from exc
        raise PermanentError(f"{what}: {exc.strerror or exc}") from exc


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to produce the file, fsync it, then rename it into place durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with disk_errors(f"writing {path}"):
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

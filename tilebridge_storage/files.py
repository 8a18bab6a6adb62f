"""Durable file writes: a file is either whole on disk or absent, never half written."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.messages import OpenManifest


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


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Turn OS errors into tilebridge's typed errors: a full disk may pass, EACCES will not."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN):
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


def image_path(root: Path, device: str, manifest: OpenManifest, suffix: str) -> Path:
    """`root/<device>/<experiment>/<image_name>_<id8><suffix>`; names are validated by the
    protocol (no separators), and the result is checked to stay under `root`."""
    name = f"{manifest.image_name}_{manifest.image_id.hex[:8]}{suffix}"
    path = root / device / manifest.experiment / name
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise PermanentError(f"refusing to write outside {root}: {path}")
    return path

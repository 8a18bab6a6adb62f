"""Local targets write only under `local_output_root`, even if a folder is swapped for a
symlink after it was checked.

A target's folder is opened once, component by component from the root with
`O_DIRECTORY | O_NOFOLLOW` (created with `mkdir(dir_fd=...)` where missing), so no symlink
and no `..` is ever followed. The backend is then given `/proc/self/fd/<fd>`: a path that
names the opened directory itself, not whatever is at the checked path later. A checked
folder renamed away and replaced by a symlink to `/etc` still gets the files (at its new
name); nothing is written through the symlink.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tilebridge_protocol.errors import PermanentError


@dataclass
class ConfinedDir:
    """An open directory under the root; `path` is what backends are given."""

    fd: int
    logical: Path

    @property
    def path(self) -> Path:
        return Path(f"/proc/self/fd/{self.fd}")

    def shown(self, location: str) -> str:
        """A backend's location with the fd path replaced by the folder the caller named."""
        return location.replace(str(self.path), str(self.logical), 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_confined(root: Path, folder: Path) -> ConfinedDir:
    """Open (creating it as needed) `folder`, which must lie under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    real_root = root.resolve()
    logical = PurePosixPath(os.path.normpath(folder))
    parts: tuple[str, ...] | None = None
    for base in (PurePosixPath(root), PurePosixPath(real_root)):
        if logical == base or base in logical.parents:
            parts = logical.relative_to(base).parts
            break
    if parts is None or ".." in PurePosixPath(folder).parts:
        raise PermanentError(
            f"output folder {folder} is outside local_output_root {real_root}: choose a "
            "folder under it (local_output_root is set in the agent's settings)"
        )
    fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            with suppress(FileExistsError):
                os.mkdir(part, 0o750, dir_fd=fd)
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PermanentError(
                        f"output folder {folder}: {part!r} is a symlink or not a folder; "
                        "local targets never follow links out of local_output_root"
                    ) from None
                raise PermanentError(f"output folder {folder}: {exc.strerror}") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return ConfinedDir(fd, Path(logical))

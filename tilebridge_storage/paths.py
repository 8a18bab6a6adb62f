"""Where a file backend puts an image under its root.

Two rules. `image_path` is the default of the services' own folders: device, experiment and
the image's id in the path, so images never meet. `named_path` is for a folder that belongs
to one acquisition's files, laid out the way the acquisition program lays them out
(ImSwitch: `<folder>/<name>.ome.zarr`, `<folder>/<name>/stitched.ome.tif`): the image's name
alone says where. There two images may ask for the same path, so an output is claimed for
its image with a marker beside it, and an output of another image is never replaced.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from uuid import UUID

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.durable import atomic_write, disk_errors, remove


def image_path(root: Path, device: str, manifest: OpenManifest, suffix: str) -> Path:
    """`root/<device>/<experiment>/<image_name>_<image_id><suffix>`, the full UUID: two
    images of a device never share a name (an 8-digit prefix let the second replace the
    first). Names are validated by the protocol (no separators), and the result is checked to
    stay under `root`."""
    name = f"{manifest.image_name}_{manifest.image_id}{suffix}"
    return _inside(root, root / device / manifest.experiment / name)


def named_path(root: Path, manifest: OpenManifest, *parts: str) -> Path:
    """`root/<parts...>` with `{name}` in a part replaced by the image's name."""
    relative = [part.format(name=manifest.image_name) for part in parts]
    return _inside(root, root.joinpath(*relative))


def claim(output: Path, image_id: UUID) -> None:
    """Mark `output` as this image's; PermanentError if it (or its marker) is another's."""
    marker = _marker(output)
    with disk_errors(f"claiming {output}"):
        owner = marker.read_text().strip() if marker.exists() else None
        if owner == str(image_id):
            return
        if owner is not None or output.exists():
            theirs = f"image {owner}" if owner else "files tilebridge did not write"
            raise PermanentError(
                f"{output} holds {theirs}; refusing to replace it with image {image_id}"
            )
        atomic_write(marker, lambda tmp: _write_owner(tmp, image_id))


def release(output: Path) -> None:
    """Give up the claim on `output` (its partial output is gone)."""
    remove(_marker(output))


def _write_owner(tmp: Path, image_id: UUID) -> None:
    tmp.write_text(f"{image_id}\n")


def _marker(output: Path) -> Path:
    return output.with_name(f".{output.name}.tilebridge")


def _inside(root: Path, path: Path) -> Path:
    """`path`, if it lies under `root` without a `..` and without a symbolic link below the
    root. Checked with `lstat` of each existing component, never by resolving names: a root
    that is a directory's /proc/self/fd path (edge_agent/confine.py) is walked by the kernel
    from the opened directory itself, while `Path.resolve()` would read its link as a name
    and follow whatever that name is now (a checked folder renamed and replaced by a symlink
    made resolve() leave the root)."""
    try:
        relative = path.relative_to(root)
    except ValueError:  # an absolute part replaced the root
        raise PermanentError(f"refusing to write outside {root}: {path}") from None
    if ".." in relative.parts:
        raise PermanentError(f"refusing to write outside {root}: {path}")
    here = root
    for part in relative.parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            break  # created later, by the backend, as a real folder or file
        if stat.S_ISLNK(mode):
            raise PermanentError(f"refusing to write through the symbolic link {here}: {path}")
    return path


def check_writable(root: Path) -> None:
    """Create `root` if missing and prove a file can be written, synced and removed there:
    a folder that is not writable says so at start-up, not at the first image (issue 13)."""
    probe = root / ".tilebridge-write-check"
    with disk_errors(f"storage folder {root} is not writable"):
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        remove(probe)

"""Where a file backend puts an image under its root."""

from __future__ import annotations

from pathlib import Path

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import OpenManifest


def image_path(root: Path, device: str, manifest: OpenManifest, suffix: str) -> Path:
    """`root/<device>/<experiment>/<image_name>_<image_id><suffix>`, the full UUID: two
    images of a device never share a name (an 8-digit prefix let the second replace the
    first). Names are validated by the protocol (no separators), and the result is checked to
    stay under `root`."""
    name = f"{manifest.image_name}_{manifest.image_id}{suffix}"
    path = root / device / manifest.experiment / name
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise PermanentError(f"refusing to write outside {root}: {path}")
    return path

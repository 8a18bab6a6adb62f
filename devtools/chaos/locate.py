"""Where a tile can be on its way: the edge's spool, the ingest's staging, the archive.

Read straight from the disks, so the verdict never depends on a message a wiped broker may
have lost: the spool and the staging by the layouts their owners document
(edge_agent/spool.py, server_ingest/staging.py; their classes open databases and create
folders, so they are not used here), the archive by its own naming rule
(tilebridge_storage.paths.image_path). A tile only moves downstream (spool -> staging ->
backends) and is removed upstream only once it is safe downstream, so looking in that order
finds every tile that exists, even while the image is still draining.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.archive import SUFFIX as ARCHIVE_SUFFIX
from tilebridge_storage.paths import image_path


def _tiles(folder: Path) -> dict[TileKey, Path]:
    found = {}
    if folder.is_dir():
        for path in folder.glob("*.tile"):
            try:
                found[TileKey.from_slug(path.stem)] = path
            except ValueError:
                continue
    return found


def buffered(spool: Path, image_id: UUID) -> dict[TileKey, Path]:
    """Tiles the agent still holds because the server has not committed them."""
    return _tiles(spool / "tiles" / str(image_id))


def set_aside(spool: Path, image_id: UUID) -> dict[TileKey, Path]:
    """Tiles the agent moved aside because the server refused them (or their image)."""
    root = spool / "rejected" / str(image_id)
    return {**_tiles(root), **_tiles(root / "tiles")}


def staged(data_dir: Path, device: str, image_id: UUID) -> dict[TileKey, Path]:
    """Tiles committed to the device and not yet let go by the ingest."""
    return _tiles(data_dir / "staging" / device / str(image_id))


def staging_holds(data_dir: Path, device: str, image_id: UUID) -> bool:
    return (data_dir / "staging" / device / str(image_id)).exists()


def archive_files(data_dir: Path, device: str, manifest: OpenManifest) -> list[Path]:
    """Every archive file of the image: where the archive puts it (its own rule), and any
    other file of the device whose name carries the image's id (a duplicate)."""
    root = data_dir / "archive"
    expected = image_path(root, device, manifest, ARCHIVE_SUFFIX)
    found = {expected} if expected.exists() else set()
    if (root / device).is_dir():
        for mark in {str(manifest.image_id), manifest.image_id.hex, manifest.image_id.hex[:8]}:
            found.update(
                p
                for p in (root / device).rglob(f"*{mark}*{ARCHIVE_SUFFIX}")
                if not p.name.startswith(".")
            )
    return sorted(found)


def archive_leftovers(data_dir: Path) -> list[Path]:
    """Partial files an interrupted archive write left behind (atomic_write's temp names)."""
    root = data_dir / "archive"
    return sorted(root.rglob(".*.partial")) if root.is_dir() else []

"""Durable staging of received tiles, before any backend sees them.

    staging/<device>/<image_id>/<slug>.part   chunks being reassembled (written in place)
    staging/<device>/<image_id>/<slug>.tile   a complete, verified, fsynced tile

A tile is acknowledged `committed` only once its `.tile` file and directory entry are on
disk. Partial files are not trusted after a restart: the device sends those tiles again.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

from tilebridge_protocol.framing import tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.topics import check_device_id
from tilebridge_runtime.durable import disk_errors, fsync_dir


class Staging:
    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def folder(root: Path, device: str, image_id: UUID) -> Path:
        # Both parts are validated (device id pattern, UUID), so the path stays under root.
        return Path(root) / check_device_id(device) / str(image_id)

    def image_dir(self, device: str, image_id: UUID) -> Path:
        return self.folder(self.root, device, image_id)

    def tile_path(self, device: str, image_id: UUID, key: TileKey) -> Path:
        return self.image_dir(device, image_id) / f"{key.slug()}.tile"

    def _part_path(self, device: str, image_id: UUID, key: TileKey) -> Path:
        return self.image_dir(device, image_id) / f"{key.slug()}.part"

    def write_chunk(
        self, device: str, image_id: UUID, key: TileKey, offset: int, data: bytes, fresh: bool
    ) -> None:
        """Place a chunk's raw bytes; `fresh` starts the tile over (truncates old leftovers)."""
        path = self._part_path(device, image_id, key)
        with disk_errors(f"staging tile {tuple(key)} of {image_id}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fresh else 0)
            fd = os.open(path, flags, 0o640)
            try:
                _pwrite_all(fd, data, offset)
            finally:
                os.close(fd)

    def seal(
        self, device: str, image_id: UUID, key: TileKey, digest: bytes, tile_bytes: int
    ) -> bool:
        """Verify the reassembled tile against `digest`, then make it durable.

        Returns False (and drops the partial file) when the bytes do not match.
        """
        part = self._part_path(device, image_id, key)
        with disk_errors(f"sealing tile {tuple(key)} of {image_id}"):
            fd = os.open(part, os.O_RDWR)
            try:
                data = _read_all(fd)
                if len(data) != tile_bytes or tile_digest(data) != digest:
                    os.unlink(part)
                    return False
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(part, self.tile_path(device, image_id, key))
            fsync_dir(part.parent)
        return True

    def discard(self, device: str, image_id: UUID, key: TileKey) -> None:
        """Drop a tile's partial file, and its sealed file if it was not accepted."""
        self._part_path(device, image_id, key).unlink(missing_ok=True)

    def load(self, device: str, manifest: OpenManifest, key: TileKey) -> np.ndarray[Any, Any]:
        """A read-only memory map of a staged tile: costs no memory until read."""
        return np.memmap(
            self.tile_path(device, manifest.image_id, key),
            dtype=manifest.dtype.numpy,
            mode="r",
            shape=(manifest.tile_height, manifest.tile_width),
        )

    def remove_image(self, device: str, image_id: UUID) -> None:
        shutil.rmtree(self.image_dir(device, image_id), ignore_errors=True)

    def sweep(self, keep: frozenset[tuple[str, UUID]], min_age_s: float) -> tuple[int, int]:
        """Remove every image folder not in `keep` whose newest file is older than
        `min_age_s` (the kept copies of stored images); (folders removed, bytes freed)."""
        removed = freed = 0
        cutoff = time.time() - min_age_s
        for folder in self.root.glob("*/*"):
            try:
                key = (folder.parent.name, UUID(folder.name))
            except ValueError:
                continue
            if key in keep or not folder.is_dir():
                continue
            files = [f.stat() for f in folder.iterdir()]
            if any(st.st_mtime >= cutoff for st in files):
                continue
            size = sum(st.st_size for st in files)
            shutil.rmtree(folder, ignore_errors=True)
            removed, freed = removed + 1, freed + size
        return removed, freed

    def drop_partials(self, device: str | None = None) -> int:
        """At start-up: partial tiles from before a restart cannot be trusted; drop them (of
        one device only: one taken over from another instance, which staged them)."""
        count = 0
        pattern = f"{check_device_id(device)}/*/*.part" if device is not None else "*/*/*.part"
        for part in self.root.glob(pattern):
            part.unlink(missing_ok=True)
            count += 1
        return count


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data`: a short write (the disk filling up) is continued, and one that
    makes no progress is a full disk, never a silently truncated chunk (issue 12, cause 6)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "no progress writing a chunk")
        view, offset = view[written:], offset + written


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 64 * 1024 * 1024), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)

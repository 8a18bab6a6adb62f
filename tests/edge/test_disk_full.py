"""A full disk under one local backend: that backend is reported failed with what it lost,
the other backends and the server stream complete.

The full disk is a real 2 MiB tmpfs mounted on the OME-TIFF backend's output directory.
Where mounting is not permitted (no root, no CAP_SYS_ADMIN), the same backend is wrapped so
its writes fail with ENOSPC once 2 MiB are written, and the test says so in its output.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from devtools.broker import free_port
from edge_agent.client import EdgeClient
from edge_agent.http import serve_http
from edge_agent.simulate import SyntheticScan
from tests.edge.test_http import check_archive, check_ome_zarr, check_stitched_tiff
from tests.edge.test_omewriter import running_stack, scan_spec
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.durable import disk_errors
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage
from tilebridge_storage.ome_tiff import OmeTiffBackend
from tilebridge_storage.ome_zarr import OmeZarrBackend
from tilebridge_storage.stitched_tiff import StitchedTiffBackend

SIZE = 2 * 1024 * 1024
SCAN = SyntheticScan(columns=3, rows=3, tile_size=512)  # 9 frames of 512 KiB: 4.5 MiB


@contextmanager
def small_filesystem(path: Path) -> Iterator[bool]:
    """Mount a 2 MiB tmpfs on `path`; yields False (and mounts nothing) if not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(path)],
        capture_output=True, check=False,
    )  # fmt: skip
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


class QuotaBackend(StorageBackend):
    """The fallback: `inner`, whose writes fail like a full disk past `quota` bytes."""

    kind = "quota"

    def __init__(self, inner: StorageBackend, quota: int) -> None:
        super().__init__(inner.name)
        self.inner, self.quota, self.used = inner, quota, 0

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        inner, backend = self.inner.open_image(device, manifest), self

        class Writer(ImageWriter):
            def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
                backend.used += pixels.nbytes
                if backend.used > backend.quota:
                    with disk_errors(f"writing tile {tuple(key)}"):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                inner.write_tile(key, pixels)

            def finish(self) -> StoredImage:
                return inner.finish()

            def abort(self) -> None:
                inner.abort()

        return Writer(device, manifest, self.name)


@pytest.mark.slow
def test_a_full_disk_fails_one_backend_and_the_others_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with small_filesystem(out / "ome_tiff") as mounted, running_stack(
        tmp_path, http_port=free_port(), local_output_root=out
    ) as stack:  # fmt: skip
        backends: dict[str, StorageBackend] | None = None
        if not mounted:
            print("mount not permitted: OME-TIFF writes fail with ENOSPC past 2 MiB instead")
            backends = {
                "ome_tiff": QuotaBackend(OmeTiffBackend(out / "ome_tiff"), SIZE),
                "ome_zarr": OmeZarrBackend(out / "ome_zarr"),
                "stitched_tiff": StitchedTiffBackend(out / "stitched_tiff"),
            }
        stop = threading.Event()
        serve_http(stack.agent, stack.settings, stop, backends=backends)
        try:
            with EdgeClient(f"http://127.0.0.1:{stack.settings.http_port}") as client:
                client.set_config(
                    write_tiff=True, write_zarr=True, write_stitched_tiff=True,
                    write_omero=True, output_dir=str(out),
                )  # fmt: skip
                image_id = UUID(client.start_experiment(**scan_spec(SCAN))["image_id"])
                manifest = stack.agent.buffer.manifest(image_id)
                tiles = {k: SCAN.frame(k) for k in manifest.tile_keys()}
                for key, pixels in tiles.items():
                    assert client.write_frame(image_id, pixels, tile_index=key.index)["accepted"]
                assert client.finalize(image_id, timeout=60)["state"] == "finalized"
                progress = client.wait_stored(image_id, timeout=60)
                status = client.status()
        finally:
            stop.set()
        if mounted:
            # Its partial output is removed, which gives the space back.
            assert [p for p in (out / "ome_tiff").rglob("*") if p.is_file()] == []

    failed = progress["backends"]["ome_tiff"]
    assert failed["state"] == "failed"
    assert failed["frames_written"] == 0 and failed["frames_lost"] == 9
    assert "No space left on device" in failed["error"]
    assert status["experiments"][0]["backends"]["ome_tiff"] == failed
    assert status["device"]["backends"]["ome_tiff"] == failed

    others = {n: b for n, b in progress["backends"].items() if n != "ome_tiff"}
    assert {n: (b["state"], b["frames_written"]) for n, b in others.items()} == {
        "ome_zarr": ("finished", 9), "stitched_tiff": ("finished", 9), "omero": ("finished", 9),
    }  # fmt: skip
    check_ome_zarr(Path(others["ome_zarr"]["location"]), manifest, tiles)
    check_stitched_tiff(Path(others["stitched_tiff"]["location"]), manifest, tiles)
    check_archive(next(stack.archive.rglob(f"*_{image_id}.ome.tif")), manifest, tiles)

"""What read-back verification costs (issue 13): the time to store one image into a backend,
from `open_image` to a durable `finish()`, with verification off (A) and on (B), alternating
A/B/A/B in one run; the ratio is B / A (1.0: free). The tiles are staged files (memory maps),
as the ingest hands them over.

    .venv/bin/python benchmarks/verify.py [--reps 5] [--grid 4] [--tile 1024]

Backends: the local archive (B reads the OME-TIFF back page by page), OMERO small images and
OMERO pyramids on the project's OMERO stand-in over real Ice (B asks the server for
`calculateMessageDigest` and digests what was written: while writing for pyramids, at the
end for small images). The stand-in runs in this process on the same two cores, so its
digest (numpy SHA-1 of the pixel buffer) costs what a real server's would roughly, but its
pixel writes are cheaper than a real server's disk: a real OMERO makes B / A smaller.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import StorageBackend
from tilebridge_storage.testing.manifests import make_manifest


def staged(manifest: Any, folder: Path) -> dict[Any, np.ndarray[Any, Any]]:
    """Every tile as a read-only memory map of a file, like the ingest's staging."""
    rng = np.random.default_rng(0)
    out = {}
    for key in manifest.tile_keys():
        path = folder / f"{key.slug()}.tile"
        shape = (manifest.tile_height, manifest.tile_width)
        rng.integers(0, 4096, shape, dtype="<u2").tofile(path)
        out[key] = np.memmap(path, dtype="<u2", mode="r", shape=shape)
    return out


def store(backend: StorageBackend, manifest: Any, tiles: dict[Any, Any]) -> float:
    start = time.perf_counter()
    writer = backend.open_image("bench", manifest)
    for key, pixels in tiles.items():
        writer.write_tile(key, pixels)
    stored = writer.finish()
    elapsed = time.perf_counter() - start
    assert (stored.digest is not None) == (getattr(backend, "verifies", True)), stored
    return elapsed


def compare(name: str, make: Callable[[bool], StorageBackend], manifest_of: Callable[[], Any],
            folder: Path, reps: int) -> None:  # fmt: skip
    a_times, b_times = [], []
    backends = {False: make(False), True: make(True)}
    for backend in backends.values():
        backend.verifies = backend is backends[True]  # type: ignore[attr-defined]
    for rep in range(reps + 1):  # the first pair warms up (imports, logins, page cache)
        for verify in (False, True):
            manifest = manifest_of()
            tiles = staged(manifest, _fresh(folder))
            seconds = store(backends[verify], manifest, tiles)
            if rep:
                (b_times if verify else a_times).append(seconds)
    for backend in backends.values():
        backend.close()
    ratios = sorted(b / a for a, b in zip(a_times, b_times, strict=True))
    mib = manifest.tile_count * manifest.tile_bytes / 2**20
    print(
        f"{name:<16} {mib:6.0f} MiB  A {statistics.median(a_times):6.3f} s  "
        f"B {statistics.median(b_times):6.3f} s  B/A min {ratios[0]:.2f} "
        f"median {statistics.median(ratios):.2f} max {ratios[-1]:.2f}"
    )


def _fresh(folder: Path) -> Path:
    sub = folder / f"tiles-{time.monotonic_ns()}"
    sub.mkdir()
    return sub


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--tile", type=int, default=1024)
    args = parser.parse_args()
    grid, tile = args.grid, args.tile

    def mosaic() -> Any:
        return make_manifest(rows=grid, columns=grid, tile=(tile, tile), overlap=0.0,
                             size_z=1, size_c=1, channels=["DAPI"], dtype="uint16")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="tb-verify-") as tmp:
        root = Path(tmp)
        compare("archive", lambda v: ArchiveBackend(root / f"archive-{v}", verify=v),
                mosaic, root, args.reps)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from pydantic import SecretStr

            from tests.omero_standin.server import OmeroStandin
            from tilebridge_storage.omero_backend.backend import OmeroBackend
            from tilebridge_storage.omero_backend.settings import DevicePolicy, OmeroSettings
        side = grid * tile
        for name, threshold in (("omero (small)", side * side), ("omero (pyramid)", 1024 * 1024)):
            server = OmeroStandin(pyramid_threshold_px=threshold)
            server.start()
            try:

                def make(verify: bool, server: Any = server) -> StorageBackend:
                    return OmeroBackend(OmeroSettings(
                        host="127.0.0.1", port=server.port, username="tilebridge",
                        password=SecretStr("tilebridge-secret"), keepalive_s=None,
                        default_policy=DevicePolicy(may_create=True, may_create_project=True),
                        verify=verify,
                    ))  # fmt: skip

                compare(name, make, mosaic, root, args.reps)
            finally:
                server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

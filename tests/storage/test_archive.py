from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from ome_types import from_xml

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.testing.contract import StorageContract, Tiles, ome_key_values
from tilebridge_storage.testing.manifests import make_manifest, make_tiles


class TestArchive(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return ArchiveBackend(tmp_path / "archive")

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        assert path.is_relative_to(Path(backend.root))  # type: ignore[attr-defined]
        held = [p for p in manifest.positions if any(k.index == p.index for k in tiles)]
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            assert len(tif.series) == len(held)  # a position without any tile: no series
            ome = from_xml(tif.ome_metadata)
            for n, (position, series) in enumerate(zip(held, tif.series, strict=True)):
                full = (
                    manifest.size_t, manifest.size_c, manifest.size_z,
                    manifest.tile_height, manifest.tile_width,
                )  # fmt: skip
                assert series.get_axes(False).rstrip("S") == "TCZYX"
                assert tuple(series.get_shape(False))[:5] == full
                data = series.asarray().reshape(full)
                for t, c, z in np.ndindex(*full[:3]):
                    expected = tiles.get(TileKey(position.index, z, c, t))
                    np.testing.assert_array_equal(
                        data[t, c, z], expected if expected is not None else 0
                    )
                image = ome.images[n]
                assert image.name == f"{manifest.image_name} position {position.index}"
                assert image.pixels.physical_size_x == manifest.pixel_size.x_um
                assert [ch.name for ch in image.pixels.channels] == list(manifest.channels)
                assert image.pixels.planes[0].position_x == position.x_um

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        with tifffile.TiffFile(stored.location) as tif:
            return ome_key_values(from_xml(tif.ome_metadata or ""))


def test_staged_tiles_cost_no_file_descriptors_until_written(tmp_path: Path) -> None:
    """The ingest hands the archive memory maps of staged tiles; holding thousands of them
    open would exhaust the process's file descriptors."""
    import os

    from tilebridge_storage.testing.manifests import make_manifest

    manifest = make_manifest(rows=10, columns=30, tile=(8, 8))  # 300 positions, 1200 tiles
    writer = ArchiveBackend(tmp_path / "archive").open_image("scope-1", manifest)
    before = len(os.listdir("/proc/self/fd"))
    expected = {}
    for n, key in enumerate(manifest.tile_keys()):
        path = tmp_path / "staged" / f"{key.slug()}.tile"
        path.parent.mkdir(exist_ok=True)
        pixels = np.full((8, 8), n, dtype="<u2")
        pixels.tofile(path)
        expected[key] = pixels
        writer.write_tile(key, np.memmap(path, dtype="<u2", mode="r", shape=(8, 8)))
    assert len(os.listdir("/proc/self/fd")) - before < 50
    stored = writer.finish()
    with tifffile.TiffFile(stored.location) as tif:
        data = tif.series[7].asarray().reshape(1, 2, 2, 8, 8)
    np.testing.assert_array_equal(data[0, 1, 0], expected[TileKey(7, 0, 1, 0)])


def _corrupting(times: list[int]) -> Any:
    """atomic_write, but the file on disk differs from what was written in one byte (a disk
    or a bug could do that) the first `times[0]` times."""
    from tilebridge_runtime import durable

    def write(path: Path, produce: Any) -> None:
        def corrupt(tmp: Path) -> None:
            produce(tmp)
            if times[0]:
                times[0] -= 1
                with tifffile.TiffFile(tmp) as tif:
                    offset = tif.pages[0].dataoffsets[0]  # type: ignore[union-attr]
                with tmp.open("r+b") as f:  # the first pixel's first byte
                    f.seek(offset)
                    first = f.read(1)
                    f.seek(offset)
                    f.write(bytes([first[0] ^ 1]))

        durable.atomic_write(path, corrupt)

    return write


def test_the_archive_reads_back_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from tilebridge_storage import archive
    from tilebridge_storage.base import DigestMismatchError

    manifest = make_manifest()
    tiles = make_tiles(manifest)
    monkeypatch.setattr(archive, "atomic_write", _corrupting([1]))
    backend = archive.ArchiveBackend(tmp_path)
    writer = backend.open_image("scope-1", manifest)
    for key, pixels in tiles.items():
        writer.write_tile(key, pixels)
    with pytest.raises(DigestMismatchError, match="read back other pixels"):
        writer.finish()
    assert not list(tmp_path.rglob("*.ome.tif"))  # the bad file is gone
    writer = backend.open_image("scope-1", manifest)
    for key, pixels in tiles.items():
        writer.write_tile(key, pixels)
    stored = writer.finish()
    sha1 = hashlib.sha1()
    m = manifest
    for p in m.positions:
        for t in range(m.size_t):
            for c in range(m.size_c):
                for z in range(m.size_z):
                    tile = tiles[TileKey(p.index, z, c, t)]
                    sha1.update(np.ascontiguousarray(tile, dtype=m.dtype.numpy).tobytes())
    assert stored.digest == f"sha1:{sha1.hexdigest()}"

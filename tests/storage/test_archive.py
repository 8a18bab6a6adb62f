from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from ome_types import from_xml

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.testing.contract import StorageContract, Tiles, ome_key_values


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

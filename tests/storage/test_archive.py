from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from ome_types import from_xml

from tests.storage.contract import StorageContract, Tiles
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.base import StorageBackend, StoredImage


class TestArchive(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return ArchiveBackend(tmp_path / "archive")

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        assert path.is_relative_to(Path(backend.root))  # type: ignore[attr-defined]
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            assert len(tif.series) == len(manifest.positions)
            ome = from_xml(tif.ome_metadata)
            for position, series in zip(manifest.positions, tif.series, strict=True):
                full = (
                    manifest.size_t, manifest.size_c, manifest.size_z,
                    manifest.tile_height, manifest.tile_width,
                )  # fmt: skip
                assert series.get_axes(False).rstrip("S") == "TCZYX"
                assert tuple(series.get_shape(False))[:5] == full
                data = series.asarray().reshape(full)
                for key in tiles:
                    if key.index == position.index:
                        np.testing.assert_array_equal(data[key.t, key.c, key.z], tiles[key])
                image = ome.images[position.index]
                assert image.pixels.physical_size_x == manifest.pixel_size.x_um
                assert [ch.name for ch in image.pixels.channels] == list(manifest.channels)
                assert image.pixels.planes[0].position_x == position.x_um
        assert TileKey(0) in tiles

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import tifffile
from ome_types import from_xml

from tests.storage.test_mosaic import plane_of
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage import stitched_tiff
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.mosaic import downsample, plan
from tilebridge_storage.stitched_tiff import StitchedTiffBackend
from tilebridge_storage.testing.contract import StorageContract, Tiles, ome_key_values

TILE = 32
"""Small tiles, so the contract's 91 x 179 canvas gets a real pyramid."""


class TestStitchedTiff(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return StitchedTiffBackend(tmp_path / "stitched", tile=TILE)

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        with tifffile.TiffFile(stored.location) as tif:
            return ome_key_values(from_xml(tif.ome_metadata or ""))

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        assert path.is_relative_to(Path(backend.root))  # type: ignore[attr-defined]
        assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no staging left
        mosaic = plan(manifest)
        full = (manifest.size_t, manifest.size_c, manifest.size_z, mosaic.height, mosaic.width)
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome and tif.is_bigtiff
            series = tif.series[0]
            assert series.get_axes(False).rstrip("S") == "TCZYX"
            assert tuple(series.get_shape(False))[:5] == full
            assert series.keyframe.is_tiled and series.keyframe.tilewidth == TILE
            levels = [
                level.asarray().reshape(full[:3] + level.shape[-2:]) for level in series.levels
            ]
            ome = from_xml(tif.ome_metadata or "")
        assert len(levels) == 4  # 91 x 179 -> 46 x 90 -> 23 x 45 -> 12 x 23
        for t, c, z in np.ndindex(*full[:3]):
            expected = plane_of(manifest, tiles, t, c, z)
            np.testing.assert_array_equal(levels[0][t, c, z], expected)
            np.testing.assert_array_equal(levels[1][t, c, z], downsample(expected))
        for finer, coarser in pairwise(levels):
            assert coarser.shape[3:] == tuple(-(-n // 2) for n in finer.shape[3:])
        assert max(levels[-1].shape[3:]) <= TILE
        pixels = ome.images[0].pixels
        assert pixels.physical_size_x == manifest.pixel_size.x_um
        assert [ch.name for ch in pixels.channels] == list(manifest.channels)
        assert pixels.planes[0].position_x == mosaic.origin_x_um
        assert ome.images[0].acquisition_date == manifest.acquired_at

    def test_finish_can_be_retried_after_a_full_disk(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.check_finish_retried_after_a_full_disk(
            backend, monkeypatch, stitched_tiff, "downsample_level"
        )


def test_per_tile_layout_is_refused(tmp_path: Path) -> None:
    manifest = StorageContract().manifest(layout="per_tile")
    with pytest.raises(PermanentError, match="mosaics only"):
        StitchedTiffBackend(tmp_path).open_image("scope-1", manifest)

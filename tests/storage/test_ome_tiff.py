from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from ome_types import from_xml

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage import ome_tiff
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.ome_tiff import OmeTiffBackend
from tilebridge_storage.testing.contract import StorageContract, Tiles, ome_key_values
from tilebridge_storage.testing.manifests import make_manifest, make_tiles


class TestOmeTiff(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return OmeTiffBackend(tmp_path / "ome_tiff")

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        folder = Path(stored.location)
        assert folder.is_relative_to(Path(backend.root))  # type: ignore[attr-defined]
        held = [p for p in manifest.positions if any(k.index == p.index for k in tiles)]
        assert len(list(folder.iterdir())) == len(held)  # no file for a position without tiles
        full = (
            manifest.size_t, manifest.size_c, manifest.size_z,
            manifest.tile_height, manifest.tile_width,
        )  # fmt: skip
        for position in held:
            path = folder / f"{manifest.image_name}_pos{position.index}.ome.tif"
            with tifffile.TiffFile(path) as tif:
                assert tif.is_ome
                series = tif.series[0]
                assert series.get_axes(False).rstrip("S") == "TCZYX"
                assert tuple(series.get_shape(False))[:5] == full
                data = series.asarray().reshape(full)
                xml = tif.ome_metadata
            for t, c, z in np.ndindex(*full[:3]):
                expected = tiles.get(TileKey(position.index, z, c, t))
                np.testing.assert_array_equal(
                    data[t, c, z], expected if expected is not None else 0
                )
            assert xml is not None
            image = from_xml(xml).images[0]
            assert image.acquisition_date == manifest.acquired_at
            assert image.pixels.physical_size_x == manifest.pixel_size.x_um
            assert image.pixels.physical_size_x_unit.value == "µm"
            assert image.pixels.physical_size_z == manifest.pixel_size.z_um
            assert [ch.name for ch in image.pixels.channels] == list(manifest.channels)
            planes = image.pixels.planes
            assert len(planes) == manifest.size_t * manifest.size_c * manifest.size_z
            assert {(p.position_x, p.position_y) for p in planes} == {
                (position.x_um, position.y_um)
            }
        assert not folder.with_name(f".{folder.name}.partial").exists()

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        first = sorted(Path(stored.location).iterdir())[0]
        with tifffile.TiffFile(first) as tif:
            return ome_key_values(from_xml(tif.ome_metadata or ""))

    def test_abort_after_finish_keeps_the_image(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
        stored = writer.finish()
        writer.abort()
        self.read_back(backend, stored, manifest, tiles)

    def test_finish_can_be_retried_after_a_full_disk(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.check_finish_retried_after_a_full_disk(backend, monkeypatch, ome_tiff.os, "replace")


def test_float_pixels_and_key_values(tmp_path: Path) -> None:
    manifest = make_manifest(dtype="float32", size_z=1, size_c=1, channels=[], columns=1, rows=1)
    tiles = make_tiles(manifest)
    writer = OmeTiffBackend(tmp_path).open_image("scope-1", manifest)
    for key, pixels in tiles.items():
        writer.write_tile(key, pixels)
    path = Path(writer.finish().location) / "scan_pos0.ome.tif"
    np.testing.assert_array_equal(tifffile.imread(path), next(iter(tiles.values())))
    with tifffile.TiffFile(path) as tif:
        ome = from_xml(tif.ome_metadata or "")
    assert ome.images[0].pixels.type.value == "float"
    assert ome.structured_annotations.map_annotations[0].value.ms[0].k == "objective"
    with pytest.raises(PermanentError):
        writer.write_tile(next(iter(tiles)), next(iter(tiles.values())))

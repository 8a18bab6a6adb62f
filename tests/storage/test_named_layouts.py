"""The backends that write where ImSwitch puts its files (`paths.named_path`): the NGFF 0.4 live
store, the named stitched pyramid, the hyperstack and one TIFF per frame. Each passes the
storage contract, read back with tifffile / zarr / ome-types; plus what the named layout adds:
an output is claimed for its image, and the live store is readable while it is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_types import from_xml
from ome_zarr_models.v04.image import Image

from tests.storage.test_mosaic import plane_of
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage import registry, stitched_tiff
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.frame_tiffs import FrameTiffsBackend
from tilebridge_storage.mosaic import downsample, plan
from tilebridge_storage.ome_zarr_v04 import OmeZarrV04Backend, chunks_of
from tilebridge_storage.stitched_tiff import HyperstackTiffBackend, NamedStitchedTiffBackend
from tilebridge_storage.testing.contract import StorageContract, Tiles, ome_key_values
from tilebridge_storage.testing.manifests import make_manifest, make_tiles

SMALL = 32
"""Small chunks and tiles, so the contract's 91 x 179 canvas gets a real pyramid."""


def mosaic_planes(path: Path, manifest: OpenManifest) -> np.ndarray:  # type: ignore[type-arg]
    mosaic = plan(manifest)
    full = (manifest.size_t, manifest.size_c, manifest.size_z, mosaic.height, mosaic.width)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.get_axes(False).rstrip("S") == "TCZYX"
        return series.levels[0].asarray().reshape(full)


class TestLiveZarr(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return OmeZarrV04Backend(tmp_path / "data", chunk=SMALL)

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        assert path == Path(backend.root) / f"{manifest.image_name}.ome.zarr"  # type: ignore[attr-defined]
        assert (path / ".zattrs").exists() and (path / "0" / ".zarray").exists()  # zarr v2
        group = zarr.open_group(path, mode="r", zarr_format=2)
        Image.from_zarr(group)  # valid NGFF 0.4
        attrs = group.attrs.asdict()
        assert attrs["multiscales"][0]["version"] == "0.4"
        assert attrs["tilebridge"]["complete"] is True
        datasets = attrs["multiscales"][0]["datasets"]
        assert len(datasets) == 4  # 91 x 179 -> 46 x 90 -> 23 x 45 -> 12 x 23
        level0, level1 = group["0"], group["1"]
        assert level0.metadata.dimension_separator == "/"  # type: ignore[union-attr]
        for t, c, z in np.ndindex(manifest.size_t, manifest.size_c, manifest.size_z):
            expected = plane_of(manifest, tiles, t, c, z)
            np.testing.assert_array_equal(level0[t, c, z], expected)  # type: ignore[index]
            np.testing.assert_array_equal(level1[t, c, z], downsample(expected))  # type: ignore[index]

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        group = zarr.open_group(stored.location, mode="r", zarr_format=2)
        return dict(group.attrs["tilebridge"]["key_values"])  # type: ignore[index,call-overload]

    def test_it_is_a_valid_store_while_it_is_written(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        first = next(iter(tiles))
        writer.write_tile(first, tiles[first])
        path = Path(backend.root) / f"{manifest.image_name}.ome.zarr"  # type: ignore[attr-defined]
        group = zarr.open_group(path, mode="r", zarr_format=2)
        Image.from_zarr(group)
        assert group.attrs["tilebridge"]["complete"] is False  # type: ignore[index,call-overload]
        mosaic = plan(manifest)
        for piece in mosaic.pieces_of(first.index):
            shown = group["0"][(first.t, first.c, first.z, *piece.canvas.slices)]  # type: ignore[index]
            np.testing.assert_array_equal(shown, tiles[first][piece.tile.slices])
        # The chunks the live view is told about are the ones the tile painted.
        rows = {r for r, _ in chunks_of(mosaic, first.index, SMALL)}
        assert rows == set(range(0, -(-manifest.tile_height // SMALL)))
        writer.abort()
        assert not path.exists()


class TestNamedStitchedTiff(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return NamedStitchedTiffBackend(tmp_path / "data", tile=SMALL)

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        with tifffile.TiffFile(stored.location) as tif:
            return ome_key_values(from_xml(tif.ome_metadata or ""))

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        root = Path(backend.root)  # type: ignore[attr-defined]
        assert path == root / manifest.image_name / "stitched.ome.tif"
        data = mosaic_planes(path, manifest)
        with tifffile.TiffFile(path) as tif:
            assert len(tif.series[0].levels) == 4
        for t, c, z in np.ndindex(*data.shape[:3]):
            np.testing.assert_array_equal(data[t, c, z], plane_of(manifest, tiles, t, c, z))

    def test_finish_can_be_retried_after_a_full_disk(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.check_finish_retried_after_a_full_disk(
            backend, monkeypatch, stitched_tiff, "downsample_level"
        )


class TestHyperstack(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return HyperstackTiffBackend(tmp_path / "data", tile=SMALL)

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        with tifffile.TiffFile(stored.location) as tif:
            return ome_key_values(from_xml(tif.ome_metadata or ""))

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        root = Path(backend.root)  # type: ignore[attr-defined]
        assert path == root / manifest.image_name / f"{manifest.image_name}.ome.tif"
        data = mosaic_planes(path, manifest)
        with tifffile.TiffFile(path) as tif:
            assert len(tif.series[0].levels) == 1  # one plain hyperstack, no pyramid
            ome = from_xml(tif.ome_metadata or "")
        assert [c.name for c in ome.images[0].pixels.channels] == list(manifest.channels)
        for t, c, z in np.ndindex(*data.shape[:3]):
            np.testing.assert_array_equal(data[t, c, z], plane_of(manifest, tiles, t, c, z))


class TestFrameTiffs(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return FrameTiffsBackend(tmp_path / "data")

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        first = sorted(Path(stored.location).rglob("*.ome.tif"))[0]
        with tifffile.TiffFile(first) as tif:
            return ome_key_values(from_xml(tif.pages[0].description))  # type: ignore[union-attr]

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        folder = Path(stored.location)
        root = Path(backend.root)  # type: ignore[attr-defined]
        assert folder == root / manifest.image_name / "tiles"
        files = sorted(folder.rglob("*.ome.tif"))
        assert len(files) == len(tiles)
        for key, pixels in tiles.items():
            p = manifest.positions[key.index]
            name = (
                f"x{round(p.x_um * 1000)}_y{round(p.y_um * 1000)}_z{key.z}_c{key.c}_"
                f"{manifest.channel_name(key.c)}_i{key.index}.ome.tif"
            )
            path = folder / f"timepoint_{key.t:04d}" / name
            with tifffile.TiffFile(path) as tif:
                np.testing.assert_array_equal(tif.asarray(), pixels)
                ome = from_xml(tif.pages[0].description)  # type: ignore[union-attr]
            plane = ome.images[0].pixels.planes[0]
            assert (plane.position_x, plane.position_y) == (p.x_um, p.y_um)
            assert ome.images[0].pixels.channels[0].name == manifest.channel_name(key.c)


def test_frame_files_are_named_by_the_time_lapse_time_point(tmp_path: Path) -> None:
    manifest = make_manifest(first_time_point=3)
    writer = FrameTiffsBackend(tmp_path).open_image("scope-1", manifest)
    for key, pixels in make_tiles(manifest).items():
        writer.write_tile(key, pixels)
    folder = Path(writer.finish().location)
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["timepoint_0003"]


@pytest.mark.parametrize("kind", ["ome_zarr_v04", "stitched_tiff_named", "ome_tiff_stack"])
def test_another_images_output_is_never_replaced(kind: str, tmp_path: Path) -> None:
    backend = registry.create(kind, folder=tmp_path)
    first = make_manifest(image_name="scan")
    writer = backend.open_image("scope-1", first)
    tiles = make_tiles(first)
    for key, pixels in tiles.items():
        writer.write_tile(key, pixels)
    stored = writer.finish()
    same_name = make_manifest(image_name="scan")  # another image_id
    with pytest.raises(PermanentError, match="refusing to replace it"):
        backend.open_image("scope-1", same_name)
    # The same image again (a resumed acquisition) may replace its own output.
    again = backend.open_image("scope-1", first)
    for key, pixels in tiles.items():
        again.write_tile(key, pixels)
    assert again.finish().location == stored.location


def test_files_that_tilebridge_did_not_write_are_never_replaced(tmp_path: Path) -> None:
    manifest = make_manifest(image_name="scan")
    (tmp_path / "scan" / "tiles").mkdir(parents=True)
    (tmp_path / "scan" / "tiles" / "mine.tif").write_bytes(b"not ours")
    with pytest.raises(PermanentError, match="files tilebridge did not write"):
        FrameTiffsBackend(tmp_path).open_image("scope-1", manifest)
    assert (tmp_path / "scan" / "tiles" / "mine.tif").read_bytes() == b"not ours"


def test_measured_metadata_reaches_the_frame_files(tmp_path: Path) -> None:
    from tilebridge_protocol.messages import PlaneMeta

    manifest = make_manifest()
    writer = FrameTiffsBackend(tmp_path).open_image("scope-1", manifest)
    for key, pixels in make_tiles(manifest).items():
        writer.write_tile(key, pixels)
    key = TileKey(2, 1, 0, 0)
    writer.add_planes({key: PlaneMeta(x_um=1.5, z_um=42.0, exposure_ms=7.5)})
    writer.finish()
    path = next((tmp_path / "scan" / "tiles").rglob("*_z1_c0_*_i2.ome.tif"))
    with tifffile.TiffFile(path) as tif:
        plane = from_xml(tif.pages[0].description).images[0].pixels.planes[0]  # type: ignore[union-attr]
    assert (plane.position_x, plane.position_z, plane.exposure_time) == (1.5, 42.0, 7.5)

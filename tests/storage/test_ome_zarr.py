from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image

from tests.storage.test_mosaic import plane_of
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage import ome_zarr
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.mosaic import downsample
from tilebridge_storage.ome_zarr import OmeZarrBackend
from tilebridge_storage.testing.contract import StorageContract, Tiles
from tilebridge_storage.testing.manifests import make_tiles

CHUNK = 32
"""Small chunks, so the contract's 91 x 179 canvas gets a real pyramid."""


class TestOmeZarr(StorageContract):
    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return OmeZarrBackend(tmp_path / "zarr", chunk=CHUNK)

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        group = zarr.open_group(stored.location, mode="r", zarr_format=3)
        return dict(group.attrs["tilebridge"]["key_values"])  # type: ignore[index,call-overload]

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        path = Path(stored.location)
        assert path.is_relative_to(Path(backend.root))  # type: ignore[attr-defined]
        assert path.name.endswith(".ome.zarr")
        assert not path.with_name(f".{path.name}.partial").exists()
        group = zarr.open_group(path, mode="r", zarr_format=3)
        Image.from_zarr(group)  # valid NGFF 0.5
        ome = group.attrs["ome"]
        multiscale = ome["multiscales"][0]  # type: ignore[index,call-overload]
        assert [a["name"] for a in multiscale["axes"]] == ["t", "c", "z", "y", "x"]
        scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
        assert scale[3:] == [manifest.pixel_size.y_um, manifest.pixel_size.x_um]
        assert [ch["label"] for ch in ome["omero"]["channels"]] == list(manifest.channels)  # type: ignore[index,call-overload]

        levels = [group[d["path"]] for d in multiscale["datasets"]]
        assert len(levels) == 4  # 91 x 179 -> 46 x 90 -> 23 x 45 -> 12 x 23
        level0 = levels[0]
        assert isinstance(level0, zarr.Array)
        assert level0.chunks == (1, 1, 1, CHUNK, CHUNK)
        for t, c, z in np.ndindex(manifest.size_t, manifest.size_c, manifest.size_z):
            expected = plane_of(manifest, tiles, t, c, z)
            np.testing.assert_array_equal(level0[t, c, z], expected)
            np.testing.assert_array_equal(levels[1][t, c, z], downsample(expected))  # type: ignore[index]
        for finer, coarser in pairwise(levels):
            assert coarser.shape[3:] == tuple(-(-n // 2) for n in finer.shape[3:])
        assert max(levels[-1].shape[3:]) <= CHUNK

    def test_second_finish_touches_no_file(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        writer = backend.open_image(self.device, manifest)
        for key, pixels in make_tiles(manifest).items():
            writer.write_tile(key, pixels)
        path = Path(writer.finish().location)
        before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
        writer.finish()
        assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before

    def test_finish_can_be_retried_after_a_full_disk(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.check_finish_retried_after_a_full_disk(
            backend, monkeypatch, ome_zarr, "downsample_level"
        )


def test_per_tile_layout_is_refused(tmp_path: Path) -> None:
    manifest = StorageContract().manifest(layout="per_tile")
    with pytest.raises(PermanentError, match="mosaics only"):
        OmeZarrBackend(tmp_path).open_image("scope-1", manifest)

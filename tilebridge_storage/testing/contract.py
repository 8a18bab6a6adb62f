"""The contract every storage backend must pass (see tilebridge_storage/base.py).

A backend's test module subclasses `StorageContract` and writes two helpers: `make_backend`
and `read_back`. Modelled on zarr-python's `zarr.testing.store.StoreTests`.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest

from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_storage import registry
from tilebridge_storage.base import Holdings, StorageBackend, StoredImage
from tilebridge_storage.testing.manifests import make_manifest, make_tiles
from tilebridge_storage.tiff_metadata import METADATA_NS

Tiles = dict[TileKey, np.ndarray[Any, Any]]


def ome_key_values(ome: Any, namespace: str = METADATA_NS) -> dict[str, str]:
    """The key-values of an `ome_types.OME` document's MapAnnotations in `namespace` (what
    the file backends write with the image)."""
    out: dict[str, str] = {}
    for annotation in ome.structured_annotations.map_annotations:
        if annotation.namespace == namespace:
            out.update(dict(annotation.value))
    return out


class StorageContract:
    """Subclass and implement `make_backend` and `read_back`."""

    device = "scope-1"
    keeps_references: bool | None = None
    """Whether the backend may keep `write_tile`'s pixels until `finish()` (base.py). None:
    what the registry says of the backend's kind (a third-party backend sets it)."""

    def make_backend(self, tmp_path: Path) -> StorageBackend:
        raise NotImplementedError

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        """Read what `stored` names with an independent reader; assert it holds `tiles`. For
        an image that holds fewer tiles (`expect`), `tiles` lacks the others: a canvas is 0
        over the area a missing tile owns, and a per-position output has no position without
        a tile (and zeros for the planes a position lacks)."""
        raise NotImplementedError

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        """The image's own key-values as `stored` holds them, read independently (for a
        per-position output: those of any one position)."""
        raise NotImplementedError

    def leftovers(self, backend: StorageBackend, manifest: OpenManifest) -> list[Any]:
        """What an aborted attempt at `manifest` left behind; default: files under the
        backend's `root` (a backend without one overrides this)."""
        root = Path(backend.root)  # type: ignore[attr-defined]
        return [p for p in root.rglob("*") if p.is_file()]

    def manifest(self, **overrides: Any) -> OpenManifest:
        """The image the contract writes; a backend may override (e.g. a bigger canvas)."""
        return make_manifest(**overrides)

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[StorageBackend]:
        backend = self.make_backend(tmp_path)
        yield backend
        backend.close()

    def test_tiles_in_any_order_are_stored_intact(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        keys = list(tiles)
        random.Random(7).shuffle(keys)
        for key in keys:
            writer.write_tile(key, tiles[key])
        stored = writer.finish()
        assert stored.backend == backend.name
        self.read_back(backend, stored, manifest, tiles)

    def test_big_endian_input_is_stored_as_values(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels.astype(pixels.dtype.newbyteorder(">")))
        self.read_back(backend, writer.finish(), manifest, tiles)

    def test_duplicate_tile_changes_nothing(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
            writer.write_tile(key, pixels.copy())
        self.read_back(backend, writer.finish(), manifest, tiles)

    def test_finish_twice_returns_the_same_and_changes_nothing(
        self, backend: StorageBackend
    ) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
        first = writer.finish()
        second = writer.finish()
        assert first == second
        self.read_back(backend, second, manifest, tiles)

    def test_write_after_finish_is_refused(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
        writer.finish()
        key = next(iter(tiles))
        with pytest.raises(PermanentError):
            writer.write_tile(key, tiles[key])

    def test_finish_with_missing_tiles_names_them(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        missing = list(tiles)[-1]
        for key, pixels in tiles.items():
            if key != missing:
                writer.write_tile(key, pixels)
        with pytest.raises(PermanentError, match="missing 1 tiles"):
            writer.finish()
        writer.abort()

    def test_foreign_key_and_wrong_shape_are_refused(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        good = next(iter(tiles))
        with pytest.raises(PermanentError):
            writer.write_tile(TileKey(len(manifest.positions), 0, 0, 0), tiles[good])
        with pytest.raises(PermanentError):
            writer.write_tile(good, tiles[good][:-1])
        with pytest.raises(PermanentError):
            writer.write_tile(good, tiles[good].astype(np.float64))
        writer.abort()

    def test_new_attempt_replaces_an_aborted_one(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        first = backend.open_image(self.device, manifest)
        for key in list(tiles)[:2]:
            first.write_tile(key, np.zeros_like(tiles[key]))
        first.abort()
        first.abort()
        second = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            second.write_tile(key, pixels)
        self.read_back(backend, second.finish(), manifest, tiles)

    def test_abort_leaves_nothing(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key in list(tiles)[:5]:
            writer.write_tile(key, tiles[key])
        writer.abort()
        assert self.leftovers(backend, manifest) == []

    def test_pixels_are_the_callers_again_unless_references_are_kept(
        self, backend: StorageBackend
    ) -> None:
        """The ownership rule of base.py: a backend that does not keep references is done
        with a tile's pixels when `write_tile` returns, so the caller may reuse the buffer
        (a camera does) without changing what is stored."""
        keeps = self.keeps_references
        if keeps is None:
            keeps = registry.KINDS[backend.kind].keeps_references
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        buffer = np.empty_like(next(iter(tiles.values())))
        for key, pixels in tiles.items():
            buffer[...] = pixels
            writer.write_tile(key, buffer if not keeps else pixels.copy())
            buffer[...] = 0  # the camera's next frame lands in the same buffer
        self.read_back(backend, writer.finish(), manifest, tiles)

    def test_plane_metadata_outside_the_image_is_refused(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        writer = backend.open_image(self.device, manifest)
        outside = TileKey(len(manifest.positions), 0, 0, 0)
        with pytest.raises(PermanentError):
            writer.add_planes({outside: PlaneMeta(z_um=1.0)})
        writer.add_planes({TileKey(0): PlaneMeta(z_um=1.0, exposure_ms=5.0)})
        assert writer.planes == {TileKey(0): PlaneMeta(z_um=1.0, exposure_ms=5.0)}
        writer.abort()

    def test_two_images_do_not_mix(self, backend: StorageBackend) -> None:
        one, two = self.manifest(), self.manifest(image_id=uuid4(), image_name="second")
        tiles_one, tiles_two = make_tiles(one, seed=1), make_tiles(two, seed=2)
        w1, w2 = backend.open_image(self.device, one), backend.open_image(self.device, two)
        for key in tiles_one:
            w1.write_tile(key, tiles_one[key])
            w2.write_tile(key, tiles_two[key])
        s1, s2 = w1.finish(), w2.finish()
        assert s1.location != s2.location
        self.read_back(backend, s1, one, tiles_one)
        self.read_back(backend, s2, two, tiles_two)

    def check_finish_retried_after_a_full_disk(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch, owner: object, name: str
    ) -> None:
        """For file backends: make `owner.name` (something `finish()` calls) fail once with
        ENOSPC; `finish()` must raise TransientError, and a second `finish()` must succeed."""
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
        real = getattr(owner, name)

        def full(*args: Any, **kwargs: Any) -> None:
            monkeypatch.setattr(owner, name, real)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(owner, name, full)
        with pytest.raises(TransientError):
            writer.finish()
        self.read_back(backend, writer.finish(), manifest, tiles)

    # -- images that hold fewer tiles than their manifest (base.py, `expect`) ----------------

    def test_a_sparse_image_holds_what_was_planned_and_is_complete(
        self, backend: StorageBackend
    ) -> None:
        """A round scan area: position 0 (a corner) was never planned. Told so after the last
        tile, the image is stored with the others, not flagged incomplete."""
        manifest = self.manifest()
        tiles = {k: v for k, v in make_tiles(manifest).items() if k.index != 0}
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
        writer.expect(Holdings(frozenset(tiles), not_planned=frozenset({0})))
        stored = writer.finish()
        self.read_back(backend, stored, manifest, tiles)
        kv = self.key_values(backend, stored, manifest)
        assert kv["tilebridge.not_planned"] == "0"
        assert "tilebridge.incomplete" not in kv
        assert kv["objective"] == "10x"  # the image's own key-values are kept beside

    def test_a_partial_image_is_stored_with_its_tiles_and_flagged_incomplete(
        self, backend: StorageBackend
    ) -> None:
        """A stopped scan, told before its first tile (an OMERO pyramid is written in one
        pass, so what it holds must not hold the pass up): tiles in any order."""
        manifest = self.manifest()
        everything = make_tiles(manifest)
        last = len(manifest.positions) - 1
        # The whole last position and one plane of the first are missing.
        gone = {k for k in everything if k.index == last} | {TileKey(0, 1, 0, 0)}
        tiles = {k: v for k, v in everything.items() if k not in gone}
        writer = backend.open_image(self.device, manifest)
        writer.expect(Holdings(frozenset(tiles), partial=True))
        order = list(tiles)
        random.Random(3).shuffle(order)
        for key in order:
            writer.write_tile(key, tiles[key])
        stored = writer.finish()
        self.read_back(backend, stored, manifest, tiles)
        kv = self.key_values(backend, stored, manifest)
        assert kv["tilebridge.incomplete"] == "true"
        assert kv["tilebridge.tiles"] == f"{len(tiles)}/{manifest.tile_count}"

    def test_what_the_image_does_not_hold_is_refused(self, backend: StorageBackend) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        held = frozenset(k for k in tiles if k.index != 0)
        writer = backend.open_image(self.device, manifest)
        with pytest.raises(PermanentError):  # a tile outside the manifest
            writer.expect(Holdings(held | {TileKey(len(manifest.positions), 0, 0, 0)}))
        writer.expect(Holdings(held, not_planned=frozenset({0})))
        with pytest.raises(PermanentError):
            writer.write_tile(TileKey(0), tiles[TileKey(0)])
        with pytest.raises(PermanentError):  # told twice, otherwise
            writer.expect(Holdings(held - {max(held)}, partial=True))
        for key in sorted(held)[1:]:
            writer.write_tile(key, tiles[key])
        with pytest.raises(PermanentError, match="missing 1 tiles"):
            writer.finish()
        writer.abort()

    def test_a_tile_written_before_it_was_known_not_held_fails_the_finish(
        self, backend: StorageBackend
    ) -> None:
        manifest = self.manifest()
        tiles = make_tiles(manifest)
        writer = backend.open_image(self.device, manifest)
        for key, pixels in tiles.items():
            writer.write_tile(key, pixels)
        writer.expect(Holdings(frozenset(k for k in tiles if k.index != 0), partial=True))
        with pytest.raises(PermanentError, match="does not hold"):
            writer.finish()
        writer.abort()

"""The one registry of backends: every kind is made by name, and what it says of a kind holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import Layout
from tilebridge_storage import registry
from tilebridge_storage.testing import make_manifest

FILE_KINDS = [k for k, spec in registry.KINDS.items() if spec.needs == "folder"]


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_every_file_kind_is_made_by_name_and_writes_under_its_folder(
    kind: str, tmp_path: Path
) -> None:
    folder = registry.folder_for(tmp_path, kind)
    backend = registry.create(kind, folder=folder, name=f"{kind}-a")
    assert (backend.kind, backend.name) == (kind, f"{kind}-a")
    manifest = make_manifest()
    writer = backend.open_image("scope-1", manifest)
    assert writer.backend_name == f"{kind}-a"
    writer.abort()
    assert folder == tmp_path / kind


@pytest.mark.parametrize("kind", [k for k, s in registry.KINDS.items() if s.mosaic_only])
def test_mosaic_only_kinds_refuse_per_tile_images(kind: str, tmp_path: Path) -> None:
    backend = registry.create(kind, folder=tmp_path)
    with pytest.raises(PermanentError, match="layout per_tile"):
        backend.open_image("scope-1", make_manifest(layout=Layout.PER_TILE))


@pytest.mark.parametrize("kind", [k for k in FILE_KINDS if not registry.KINDS[k].mosaic_only])
def test_other_file_kinds_take_per_tile_images(kind: str, tmp_path: Path) -> None:
    # (OMERO takes them too: tests/omero writes per_tile images into the stand-in.)
    backend = registry.create(kind, folder=tmp_path)
    backend.open_image("scope-1", make_manifest(layout=Layout.PER_TILE)).abort()


def test_unknown_kinds_are_named_with_the_known_ones() -> None:
    with pytest.raises(PermanentError, match=r"unknown storage backends \['s3'\]; known: \["):
        registry.check_known(["archive", "s3"])
    with pytest.raises(PermanentError, match="unknown storage backend 'nfs'"):
        registry.create("nfs", folder=Path("/tmp"))


def test_a_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "zarr" else real(name, *a)
    )
    assert registry.KINDS["ome_zarr"].unavailable() == "the ome_zarr backend needs zarr"
    with pytest.raises(PermanentError, match="needs zarr"):
        registry.create("ome_zarr", folder=Path("/tmp"))
    assert registry.KINDS["omero"].extra == "omero"


def test_a_file_kind_without_a_folder_is_refused() -> None:
    with pytest.raises(PermanentError, match="needs a folder"):
        registry.create("archive")

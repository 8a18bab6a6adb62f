"""Where file backends may write: under their root, whatever the names or the folder do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tilebridge_protocol.errors import PermanentError
from tilebridge_storage.paths import image_path, named_path
from tilebridge_storage.testing.manifests import make_manifest


def test_a_root_given_by_its_open_directory_follows_a_rename(tmp_path: Path) -> None:
    """The edge hands local targets `/proc/self/fd/<n>` of a folder it opened; the folder
    may be renamed afterwards and the path must still count as inside it."""
    folder = tmp_path / "scans"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        root = Path(f"/proc/self/fd/{fd}")
        manifest = make_manifest()
        before = image_path(root, "scope-1", manifest, ".ome.tif")
        os.rename(folder, tmp_path / "scans.moved")
        folder.symlink_to(tmp_path)  # the old name now points elsewhere
        assert image_path(root, "scope-1", manifest, ".ome.tif") == before
        stitched = named_path(root, manifest, "{name}", "stitched.ome.tif")
        assert stitched == root / manifest.image_name / "stitched.ome.tif"
    finally:
        os.close(fd)


@pytest.mark.parametrize("parts", [("..", "x"), ("a", "..", "..", "x"), ("/etc", "x")])
def test_names_that_leave_the_root_are_refused(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(PermanentError, match="refusing to write outside"):
        named_path(tmp_path, make_manifest(), *parts)


def test_a_subfolder_swapped_for_a_symlink_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "scope-1").symlink_to(outside)
    with pytest.raises(PermanentError, match="symbolic link"):
        image_path(root, "scope-1", make_manifest(), ".ome.tif")

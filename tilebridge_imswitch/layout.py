"""Where ImSwitch's local files go, and which storage backend writes each. Pure logic.

ImSwitch names a writer's files after its `base_dir` (`OMEFileStorePaths`): the Zarr store
`<base_dir>.ome.zarr`, the rest inside `<base_dir>/`. The backends' named layout
(`tilebridge_storage.paths.named_path`) writes the same paths from the folder `base_dir` is
in and the image's name, `base_dir`'s own name.
"""

from __future__ import annotations

from pathlib import Path

from tilebridge_imswitch.config import WriterConfig
from tilebridge_imswitch.port import LocalTarget

KINDS = {
    # WriterConfig flag: the storage backend kind that writes it where ImSwitch looks
    "write_zarr": "ome_zarr_v04",
    "write_stitched_tiff": "stitched_tiff_named",
    "write_tiff": "ome_tiff_stack",
    "write_individual_tiffs": "frame_tiffs",
}


LIVE = "ome_zarr_v04"
"""The target ImSwitch's live view reads after every frame (`store` and the chunk info)."""


def targets(config: WriterConfig, folder: Path) -> list[LocalTarget]:
    return [
        LocalTarget(kind, folder, live=kind == LIVE)
        for flag, kind in KINDS.items()
        if getattr(config, flag)
    ]


def zarr_store(folder: Path, name: str) -> Path:
    return folder / f"{name}.ome.zarr"


def taken(folder: Path, name: str) -> bool:
    """Whether any output of an image called `name` exists in `folder` already."""
    return any(
        path.exists()
        for path in (
            zarr_store(folder, name),
            folder / name / "stitched.ome.tif",
            folder / name / f"{name}.ome.tif",
            folder / name / "tiles",
        )
    )

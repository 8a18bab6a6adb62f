"""Small images for storage tests: a 3 x 2 grid with overlap, two channels, two z planes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import numpy as np

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PixelSize, StagePosition


def make_manifest(
    *,
    image_id: UUID | None = None,
    image_name: str = "scan",
    columns: int = 3,
    rows: int = 2,
    tile: tuple[int, int] = (48, 64),
    overlap: float = 0.1,
    pixel_um: float = 0.5,
    **overrides: Any,
) -> OpenManifest:
    height, width = tile
    step_x, step_y = width * (1 - overlap) * pixel_um, height * (1 - overlap) * pixel_um
    positions = [
        StagePosition(index=r * columns + c, x_um=100 + c * step_x, y_um=50 + r * step_y)
        for r in range(rows)
        for c in range(columns)
    ]
    fields: dict[str, Any] = {
        "image_id": image_id or uuid4(),
        "experiment": "contract",
        "project": "tilebridge-tests",
        "dataset": "storage",
        "image_name": image_name,
        "tile_width": width,
        "tile_height": height,
        "size_z": 2,
        "size_c": 2,
        "size_t": 1,
        "dtype": "uint16",
        "positions": positions,
        "pixel_size": PixelSize(x_um=pixel_um, y_um=pixel_um, z_um=2.0),
        "channels": ["DAPI", "GFP"],
        "acquired_at": datetime(2026, 11, 24, 9, 30, tzinfo=UTC),
        "key_values": {"objective": "10x"},
    }
    fields.update(overrides)
    return OpenManifest.model_validate(fields)


def make_tiles(manifest: OpenManifest, seed: int = 0) -> dict[TileKey, np.ndarray[Any, Any]]:
    """Distinct, non-constant content per tile, so a misplaced tile is caught."""
    rng = np.random.default_rng(seed)
    dtype = manifest.dtype.numpy
    shape = (manifest.tile_height, manifest.tile_width)

    def tile() -> np.ndarray[Any, Any]:
        if dtype.kind in "ui":
            return rng.integers(0, min(int(np.iinfo(dtype).max), 60000), shape).astype(dtype)
        return rng.random(shape).astype(dtype)

    return {key: tile() for key in manifest.tile_keys()}

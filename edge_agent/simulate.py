"""A synthetic tile scan that looks like fluorescence microscopy, not noise.

The specimen is a field of cells (bright nuclei with dimmer cytoplasm) over a smooth
background; each frame is the part of it the camera sees at one stage position, with shot
noise seeded by the tile, so a frame can be regenerated bit for bit to check what was stored.
Overlapping frames show the same cells in their shared strip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

import numpy as np

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PixelSize, PixelType, StagePosition

_NAMESPACE = UUID("6f1c1ae2-5d0c-4c53-9d59-7b0f62f0c1a4")


@dataclass(frozen=True)
class SyntheticScan:
    columns: int = 4
    rows: int = 4
    tile_size: int = 2048
    overlap: float = 0.1
    channels: int = 1
    z_planes: int = 1
    pixel_um: float = 0.65
    seed: int = 0
    experiment: str = "simulated-scan"
    project: str = "tilebridge-demo"
    dataset: str = "simulated"
    image_name: str = "tilescan"
    image_id: UUID | None = None
    _cells: np.ndarray[Any, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        width, height = self.canvas_size
        count = max(1, int(width * height / 9000))
        cells = np.empty((count, 4))
        cells[:, 0] = rng.uniform(0, width, count)  # x
        cells[:, 1] = rng.uniform(0, height, count)  # y
        cells[:, 2] = rng.uniform(4, 11, count)  # nucleus radius, px
        cells[:, 3] = rng.uniform(1500, 9000, count)  # brightness
        object.__setattr__(self, "_cells", cells)

    @property
    def step_px(self) -> int:
        return round(self.tile_size * (1 - self.overlap))

    @property
    def canvas_size(self) -> tuple[int, int]:
        return (
            self.step_px * (self.columns - 1) + self.tile_size,
            self.step_px * (self.rows - 1) + self.tile_size,
        )

    def manifest(self) -> OpenManifest:
        image_id = self.image_id or uuid5(_NAMESPACE, repr(self))
        step_um = self.step_px * self.pixel_um
        positions = [
            StagePosition(index=r * self.columns + c, x_um=c * step_um, y_um=r * step_um)
            for r in range(self.rows)
            for c in range(self.columns)
        ]
        return OpenManifest(
            image_id=image_id,
            experiment=self.experiment,
            project=self.project,
            dataset=self.dataset,
            image_name=self.image_name,
            tile_width=self.tile_size,
            tile_height=self.tile_size,
            size_z=self.z_planes,
            size_c=self.channels,
            dtype=PixelType.UINT16,
            positions=tuple(positions),
            pixel_size=PixelSize(x_um=self.pixel_um, y_um=self.pixel_um, z_um=1.0),
            channels=tuple(["DAPI", "GFP", "mCherry", "Cy5"][c % 4] for c in range(self.channels)),
            acquired_at=datetime(2026, 11, 24, 8, 0, tzinfo=UTC),
            key_values={"simulator": "tilebridge", "seed": str(self.seed)},
        )

    def frame(self, key: TileKey) -> np.ndarray[Any, Any]:
        """The camera frame of `key`: same call, same pixels."""
        row, col = divmod(key.index, self.columns)
        x0, y0 = col * self.step_px, row * self.step_px
        size = self.tile_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        image = 300 + 200 * np.sin((xx + x0) / 900.0) * np.cos((yy + y0) / 1100.0)
        defocus = 1.0 + 0.6 * abs(key.z - (self.z_planes - 1) / 2)
        cells = self._cells
        near = (
            (cells[:, 0] > x0 - 40) & (cells[:, 0] < x0 + size + 40)
            & (cells[:, 1] > y0 - 40) & (cells[:, 1] < y0 + size + 40)
        )  # fmt: skip
        for cx, cy, radius, brightness in cells[near]:
            r = radius * defocus
            reach = int(3 * r) + 1
            xa, xb = max(0, int(cx - x0) - reach), min(size, int(cx - x0) + reach)
            ya, yb = max(0, int(cy - y0) - reach), min(size, int(cy - y0) + reach)
            if xa >= xb or ya >= yb:
                continue
            dx = xx[ya:yb, xa:xb] + x0 - cx
            dy = yy[ya:yb, xa:xb] + y0 - cy
            d2 = (dx * dx + dy * dy) / (r * r)
            channel_gain = (1.0, 0.45, 0.7, 0.3)[key.c % 4]
            nucleus = np.exp(-d2 * 2) * (1.0 if key.c == 0 else 0.25)
            cytoplasm = 0.0 if key.c == 0 else 0.35 * np.exp(-d2 / 6)
            image[ya:yb, xa:xb] += brightness * channel_gain * (nucleus + cytoplasm) / defocus
        rng = np.random.default_rng([self.seed, key.index, key.z, key.c, key.t])
        noisy = rng.poisson(np.clip(image, 0, None)).astype(np.float32)
        frame: np.ndarray[Any, Any] = np.clip(noisy, 0, 65535).astype(np.uint16)
        return frame

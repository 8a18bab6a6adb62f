"""Which tile of the experiment a frame is, and its pixels in the manifest's shape."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edge_agent.models import FrameInfo
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest

MAX_WARNINGS = 20
"""Off-position warnings kept per experiment; a drifting stage would otherwise flood them."""


class FrameMatcher:
    """Places frames in one experiment: their tile, and pixels in the manifest's shape."""

    def __init__(self, manifest: OpenManifest) -> None:
        self.manifest = manifest
        self.warnings: list[str] = []
        self._centres = np.array([(p.x_um, p.y_um) for p in manifest.positions])

    def key(self, info: FrameInfo) -> TileKey:
        m = self.manifest
        index = info.tile_index if info.tile_index is not None else self._nearest(info)
        c = info.channel_index
        if info.channel is not None and m.channels:
            if info.channel not in m.channels:
                raise PermanentError(f"channel {info.channel!r} is not one of {list(m.channels)}")
            named = m.channels.index(info.channel)
            if c is not None and c != named:
                raise PermanentError(f"channel {info.channel!r} is channel_index {named}, not {c}")
            c = named
        key = TileKey(index, info.z_index, c or 0, info.time_index)
        if not m.has_tile(key):
            raise PermanentError(
                f"frame (tile_index={key.index} z_index={key.z} channel_index={key.c} "
                f"time_index={key.t}) is outside the experiment ({len(m.positions)} positions, "
                f"size_z={m.size_z} size_c={m.size_c} size_t={m.size_t})"
            )
        size = info.pixel_size_um
        if size is not None and not math.isclose(size, m.pixel_size.x_um, rel_tol=1e-3):
            raise PermanentError(
                f"pixel_size_um {size} differs from the experiment's {m.pixel_size.x_um}"
            )
        self._check_position(key.index, info)
        return key

    def pixels(self, frame: np.ndarray[Any, Any], copy_shared: bool) -> np.ndarray[Any, Any]:
        """The frame as a read-only (tile_height, tile_width) array of the manifest's dtype;
        `copy_shared`: never share memory with `frame`."""
        m = self.manifest
        data = np.asarray(frame)
        want = m.dtype.numpy
        if data.dtype.newbyteorder("=") != want.newbyteorder("="):
            raise PermanentError(f"frame has dtype {data.dtype}, the experiment {m.dtype}")
        shape = (m.tile_height, m.tile_width)
        if data.shape != shape:
            if data.ndim != 1 or data.size != m.tile_height * m.tile_width:
                raise PermanentError(f"frame has shape {data.shape}, the experiment {shape}")
            data = data.reshape(shape)
        pixels = np.ascontiguousarray(data, dtype=want)
        if copy_shared and np.may_share_memory(pixels, data):
            pixels = pixels.copy()
        pixels.flags.writeable = False
        return pixels

    def _nearest(self, info: FrameInfo) -> int:
        if info.x_um is None or info.y_um is None:
            raise PermanentError("a frame needs tile_index, or stage x_um and y_um")
        centres = self._centres
        distance = np.hypot(centres[:, 0] - info.x_um, centres[:, 1] - info.y_um)
        index = int(np.argmin(distance))
        # Within half the way to the nearest other position (and half a tile), so a frame
        # is never given to a neighbour's slot.
        m = self.manifest
        limit = 0.5 * min(m.tile_width * m.pixel_size.x_um, m.tile_height * m.pixel_size.y_um)
        spacing = np.hypot(centres[:, 0] - centres[index, 0], centres[:, 1] - centres[index, 1])
        spacing[spacing == 0] = np.inf
        limit = min(limit, 0.5 * float(spacing.min()))
        if distance[index] > limit:
            raise PermanentError(
                f"stage position ({info.x_um}, {info.y_um}) µm is no planned position "
                f"(nearest: tile_index {index}, {distance[index]:.1f} µm away)"
            )
        return index

    def _check_position(self, index: int, info: FrameInfo) -> None:
        if info.x_um is None or info.y_um is None or len(self.warnings) >= MAX_WARNINGS:
            return
        planned = self.manifest.positions[index]
        off = math.hypot(info.x_um - planned.x_um, info.y_um - planned.y_um)
        if off > 1.0 + self.manifest.pixel_size.x_um:
            # The manifest (and so every output) keeps the planned position.
            self.warnings.append(
                f"tile {index} was acquired {off:.1f} µm from its planned position"
            )

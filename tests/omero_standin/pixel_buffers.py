"""Pixel data kept per Pixels object, and the life cycle of a pyramid write pass.

The data survives stop()/start() of the server, like a real binary repository; what does not
survive is a pass in progress: it becomes BROKEN and can never be written again.
"""

from __future__ import annotations

import enum
import threading

import numpy as np

from .rules import Geometry, Tile, WriteRules, misuse

MISSING_PYRAMID = "Pixels pyramid missing, being created or import in progress."


class PyramidState(enum.Enum):
    EMPTY = "empty"  # nothing written yet
    WRITING = "writing"  # one store is in its single pass
    COMPLETE = "complete"  # every tile arrived in order, then writing ended
    BROKEN = "broken"  # writing ended before the pass was complete: delete and rewrite


class PixelBuffer:
    def __init__(self, pixels_id: int, geometry: Geometry, rules: WriteRules) -> None:
        self.pixels_id = pixels_id
        self.geometry = geometry
        self.rules = rules
        self.pyramid = rules.requires_pyramid(geometry)
        self.data = np.zeros(geometry.shape, dtype=geometry.dtype)
        self.state = PyramidState.EMPTY
        self.writer: object | None = None  # the store that owns the pass in progress
        self.tiles_done = 0
        self.corrupted = False  # a flip_byte fault hit this buffer already
        self.tiles_total = rules.pyramid_tile_count(geometry) if self.pyramid else 0
        self._next_tiles = rules.pyramid_tiles(geometry) if self.pyramid else iter(())

    # -- pyramid pass --------------------------------------------------------------------
    def begin_pass(self, store: object) -> None:
        if self.state is PyramidState.WRITING and self.writer is store:
            return
        if self.state is PyramidState.EMPTY:
            self.state, self.writer = PyramidState.WRITING, store
            return
        if self.state is PyramidState.WRITING:
            is_alive = getattr(self.writer, "is_alive", lambda: True)
            if is_alive():
                raise misuse(
                    f"pyramid of Pixels:{self.pixels_id} is being written by another store"
                )
            # The writing store died with its session: that pass is lost.
            self.state, self.writer = PyramidState.BROKEN, None
            return self.begin_pass(store)
        raise misuse(
            f"pyramid of Pixels:{self.pixels_id} is {self.state.value} and read-only: a pyramid "
            "is written in one pass; delete the image and write it again"
        )

    def accept_pyramid_tile(self, store: object, tile: Tile, values: np.ndarray) -> None:
        self.begin_pass(store)
        expected = next(self._next_tiles, None)
        if tile != expected:
            # An out-of-order tile would corrupt the pyramid file: the pass is lost.
            self.end_pass(store)
            raise misuse(
                f"pyramid tiles must come in one pass, planes in XYZCT order and tiles in "
                f"raster order; expected {expected}, got {tile}"
            )
        self._store(tile, values)
        self.tiles_done += 1

    def end_pass(self, store: object) -> None:
        if self.state is not PyramidState.WRITING or self.writer is not store:
            return
        complete = self.tiles_done == self.tiles_total
        self.state = PyramidState.COMPLETE if complete else PyramidState.BROKEN
        self.writer = None

    def interrupt(self) -> None:
        """The server died: a pass in progress is lost for good."""
        if self.state is PyramidState.WRITING:
            self.state, self.writer = PyramidState.BROKEN, None

    # -- plain data access ---------------------------------------------------------------
    def _store(self, tile: Tile, values: np.ndarray) -> None:
        plane = self.data[tile.t, tile.c, tile.z]
        plane[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w] = values.reshape(tile.h, tile.w)

    def write_region(self, tile: Tile, values: np.ndarray) -> None:
        self._store(tile, values)

    def readable(self) -> bool:
        return not self.pyramid or self.state is PyramidState.COMPLETE


class PixelRepository:
    """All pixel buffers by Pixels id (the stand-in's binary repository)."""

    def __init__(self, rules: WriteRules) -> None:
        self.rules = rules
        self.lock = threading.RLock()
        self._buffers: dict[int, PixelBuffer] = {}

    def create(self, pixels_id: int, geometry: Geometry) -> PixelBuffer:
        with self.lock:
            buf = PixelBuffer(pixels_id, geometry, self.rules)
            self._buffers[pixels_id] = buf
            return buf

    def get(self, pixels_id: int) -> PixelBuffer | None:
        with self.lock:
            return self._buffers.get(pixels_id)

    def delete(self, pixels_id: int) -> None:
        with self.lock:
            self._buffers.pop(pixels_id, None)

    def interrupt_all(self) -> None:
        with self.lock:
            for buf in self._buffers.values():
                buf.interrupt()

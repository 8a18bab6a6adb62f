"""The images of one writer (one per time point it sees) and their traffic with the edge port.

An image is made once (its manifest, so an open the agent refused is tried again as the same
image), opened on the edge, written tile by tile, and closed saying what it lacks: grid
cells without a single frame were never planned (a round or oval scan area: the image is
complete, sparse) when the writer's scan can have such cells, and any other frame missing
means the scan ended early (partial). Calls that the agent answers with "try again"
(`TransientError`) are repeated for `retry_for_s` with backoff, then the error goes to the
caller. Used by `writer.OMEWriter` under its lock only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from tilebridge_imswitch import frames
from tilebridge_imswitch.port import Edge, LocalTarget, Written
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_runtime.backoff import Backoff
from tilebridge_storage.mosaic import CHUNK, Mosaic, chunks_of, plan

R = TypeVar("R")


@dataclass
class Image:
    manifest: OpenManifest
    mosaic: Mosaic
    received: set[TileKey] = field(default_factory=set)
    opened: bool = False
    closed: bool = False


class Images:
    def __init__(self, edge: Edge, retry_for_s: float, logger: Any) -> None:
        self.edge = edge
        self.retry_for_s = retry_for_s
        self.logger = logger
        self.by_time: dict[int, Image] = {}

    def get(
        self, time_point: int, make: Callable[[], OpenManifest], local: Sequence[LocalTarget]
    ) -> Image:
        """The open image of `time_point`, made by `make()` and opened if it is new."""
        image = self.by_time.get(time_point)
        if image is not None and image.closed:
            raise PermanentError(f"time point {time_point} of this writer is closed")
        if image is None:
            m = make()
            image = self.by_time[time_point] = Image(m, plan(m))
        if not image.opened:
            m = image.manifest
            self.retrying(lambda: self.edge.open(m, local))
            image.opened = True
            self.logger.info(
                f"tilebridge: {m.image_name} ({m.image_id}) opened: {len(m.positions)} "
                f"positions, {m.size_c} channels, {m.size_z} planes, {m.dtype.value}"
            )
        return image

    def put(
        self, image: Image, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> Written:
        m = image.manifest
        if pixels.shape != (m.tile_height, m.tile_width):
            raise PermanentError(
                f"frame of {pixels.shape[1]} x {pixels.shape[0]} px; this writer's frames are "
                f"{m.tile_width} x {m.tile_height}"
            )
        if frames.pixel_type(pixels) is not m.dtype:
            raise PermanentError(f"frame of dtype {pixels.dtype}; this writer's are {m.dtype}")
        written = self.retrying(lambda: self.edge.write(m.image_id, key, pixels, meta))
        image.received.add(key)
        return written

    def close_all(self, sparse: bool) -> None:
        for image in self.by_time.values():
            self.close(image, sparse)

    def close(self, image: Image, sparse: bool) -> None:
        """Close `image`; `sparse`: its grid may have cells the scan never planned."""
        if image.closed:
            return
        image.closed = True
        m = image.manifest
        if not image.opened:
            self.logger.error(
                f"tilebridge: {m.image_name} was never opened by the edge agent; its frames "
                "were refused"
            )
            return
        taken = {key.index for key in image.received}
        not_planned = [p.index for p in m.positions if p.index not in taken] if taken else []
        if not sparse:
            not_planned = []
        missing = [
            k for k in m.tile_keys() if k not in image.received and k.index not in not_planned
        ]
        if not_planned:
            self.logger.info(
                f"tilebridge: {m.image_name}: {len(not_planned)} of {len(m.positions)} grid "
                "cells have no frame: never planned (a round or oval scan area)"
            )
        if missing:
            self.logger.warning(
                f"tilebridge: {m.image_name}: {len(missing)} planned frames never came (the "
                "scan stopped, or a frame was refused): it is stored as incomplete"
            )
        self.retrying(lambda: self.edge.close(m.image_id, not_planned, bool(missing)))
        for name, target in self.edge.progress(m.image_id).targets.items():
            if target.state == "failed":
                self.logger.error(f"tilebridge: {m.image_name}: {name} failed: {target.error}")

    def abort(self) -> None:
        for image in self.by_time.values():
            if image.opened and not image.closed:
                self.edge.abort(image.manifest.image_id)
            image.closed = True

    def incomplete(self) -> bool:
        return any(len(i.received) < i.manifest.tile_count for i in self.by_time.values())

    def retrying(self, call: Callable[[], R]) -> R:
        """`call()`, again while it raises TransientError, for `retry_for_s` at most."""
        deadline = time.monotonic() + self.retry_for_s
        backoff = Backoff(first_s=0.2, max_s=5.0)
        while True:
            try:
                return call()
            except TransientError as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise
                self.logger.warning(f"tilebridge: {exc}; trying again in {delay:.1f} s")
                time.sleep(delay)


def chunk_info(
    image: Image, index: int, z: int, c: int, channel: int, cell: tuple[int, int], t: int
) -> dict[str, Any]:
    """What ImSwitch's live view is told about a frame: the Zarr chunks it painted (level 0,
    relative to the store), its grid cell, where it sits on the canvas, its plane."""
    m, mosaic = image.manifest, image.mosaic
    chunks = chunks_of(mosaic, index, CHUNK)
    oy, ox = mosaic.offsets[index]
    row, column = chunks[0] if chunks else (oy // CHUNK, ox // CHUNK)
    return {
        "rel_chunk": f"0/0/{c}/{z}/{row}/{column}",
        "grid_pos": cell,
        "canvas_bounds": (ox, ox + m.tile_width, oy, oy + m.tile_height),
        "t_idx": t,
        "c_idx": channel,
        "z_idx": z,
        "chunks": [f"0/0/{c}/{z}/{r}/{col}" for r, col in chunks],
    }

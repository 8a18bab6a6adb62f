"""The port over today's local HTTP API of the agent service (`edge_agent.client.EdgeClient`).

What that API cannot carry yet is said here, not hidden: an experiment spec has no place for
channel colours, the time interval, the time point or the well, so they travel as key-values
(the server stores them as such); a frame's measured stage position and exposure go as
frame metadata, which the agent does not yet put into the close (so the server keeps the
planned positions); local files and images with holes are the `stopgap`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import numpy as np

from edge_agent.client import EdgeApiError, EdgeClient
from tilebridge_imswitch.port import SERVER, LocalTarget, Progress, Target
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_storage.plane_metadata import image_key_values

SERVER_ONLY = {
    "write_tiff": False,
    "write_zarr": False,
    "write_stitched_tiff": False,
    "write_omero": True,
    "layout": "mosaic",
}
"""The agent's own local writers stay off: the files ImSwitch expects are written elsewhere."""


class HttpEdge:
    def __init__(self, client: EdgeClient, finalize_timeout_s: float = 600.0) -> None:
        self.client = client
        self.finalize_timeout_s = finalize_timeout_s
        self._configured = False
        self._started: dict[UUID, OpenManifest] = {}
        """What each open image was opened with (writers of several threads: `_lock`)."""
        self._lock = threading.Lock()

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        if local:
            raise PermanentError("the agent's HTTP API takes no local targets yet")
        with _answers("starting the experiment"):
            if not self._configured:  # idempotent: threads racing here set the same values
                self.client.set_config(**SERVER_ONLY)
                self._configured = True
            self.client.start_experiment(**spec_of(manifest))
        with self._lock:
            self._started[manifest.image_id] = manifest

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        fields: dict[str, Any] = {
            "tile_index": key.index,
            "z_index": key.z,
            "channel_index": key.c,
            "time_index": key.t,
            "x_um": meta.x_um,
            "y_um": meta.y_um,
            "z_um": meta.z_um,
            "exposure_ms": meta.exposure_ms,
        }
        with self._lock:
            manifest = self._started.get(image_id)
        if manifest is not None:
            fields["timestamp"] = timestamp_of(manifest, meta)
        with _answers(f"writing tile {tuple(key)}"):
            answer = self.client.write_frame(image_id, pixels, **fields)
        return bool(answer["accepted"])

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        if never_taken:
            raise PermanentError(
                f"the agent cannot close an image with {len(never_taken)} tiles never taken yet"
            )
        with _answers("finalizing"):
            self.client.finalize(image_id, timeout=self.finalize_timeout_s)
        with self._lock:
            self._started.pop(image_id, None)

    def progress(self, image_id: UUID) -> Progress:
        with _answers("reading the experiment's progress"):
            answer = self.client.experiment(image_id)
        server = answer["backends"].get("omero")
        if server is None:
            return Progress(image_id)
        target = Target(server["state"], server.get("error"), server.get("location"))
        return Progress(image_id, {SERVER: target})

    def abort(self, image_id: UUID) -> None:
        with _answers("aborting"):
            self.client.abort(image_id)
        with self._lock:
            self._started.pop(image_id, None)


def flattened_key_values(m: OpenManifest) -> dict[str, str]:
    """The manifest's key-values with what an experiment spec has no field for yet (colours,
    time interval and point, well) as text."""
    key_values = image_key_values(m)
    if m.channel_colors:
        key_values.setdefault("channel_colors", ",".join(m.channel_colors))
    return dict(list(key_values.items())[:256])


def spec_of(m: OpenManifest) -> dict[str, Any]:
    """The HTTP API's experiment spec of a manifest; what it has no field for as key-values."""
    return {
        "experiment": m.experiment,
        "image_name": m.image_name,
        "image_id": str(m.image_id),
        "tile_width": m.tile_width,
        "tile_height": m.tile_height,
        "dtype": m.dtype.value,
        "pixel_size_um": m.pixel_size.x_um,
        "pixel_size_y_um": m.pixel_size.y_um,
        "z_step_um": m.pixel_size.z_um,
        "positions": [
            {"x_um": p.x_um, "y_um": p.y_um, "z_um": p.z_um}
            for p in sorted(m.positions, key=lambda p: p.index)
        ],
        "channels": list(m.channels),
        "size_c": m.size_c,
        "size_z": m.size_z,
        "size_t": m.size_t,
        "key_values": flattened_key_values(m),
        "tags": list(m.tags),
        "acquired_at": m.acquired_at.isoformat(),
        "project": m.project,
        "dataset": m.dataset,
    }


def timestamp_of(m: OpenManifest, meta: PlaneMeta) -> datetime | None:
    if meta.delta_t_s is None:
        return None
    return m.acquired_at + timedelta(seconds=meta.delta_t_s)


@contextmanager
def _answers(what: str) -> Iterator[None]:
    """The API's answers as tilebridge errors: 503 and an unreachable agent pass, a refusal
    (4xx, with the agent's reason) does not."""
    try:
        yield
    except EdgeApiError as exc:
        if exc.status_code >= 500:
            raise TransientError(f"edge agent, {what}: {exc.message}") from exc
        raise PermanentError(f"edge agent refused {what}: {exc.message}") from exc
    except httpx.TransportError as exc:
        raise TransientError(f"edge agent unreachable, {what}: {exc}") from exc

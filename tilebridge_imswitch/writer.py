"""`OMEWriter`: ImSwitch's writer, with its constructor and methods, written through tilebridge.

One writer is one ImSwitch scan area of one time point (that is how ImSwitch's experiment
modes make them). Its frames become one tilebridge image per time point they carry (see
`manifest`), opened on the first frame, when the frame's dtype and size are known, and
closed by `finalize()`:

* `write_frame` places the frame by its stage x/y (`placement`), hands it to the edge port
  (durable on the Pi before it returns, and in the Zarr store, the live target; the server
  stream and the other local files follow from there) and returns the chunk info ImSwitch's
  live view uses, or `{}` without a Zarr store (or when the store did not take it in time).
  A frame that matches no planned position, or does not fit the writer (a channel or z plane
  it does not have, another size or dtype), is refused with `PermanentError` and the reason;
  ImSwitch logs it. While the agent says "try again" (restarting, disk full) the frame is
  retried for `retry_for_s`, which holds ImSwitch's frame saver back instead of losing it.
* In performance mode frames name their channel only by `illuminationChannel`; until every
  configured channel was seen (the first position's frames), frames wait in memory, and the
  image opens with those names.
* `finalize()` closes the image with the frames that exist; called again it does nothing. In
  normal mode a grid cell without a single frame was never planned (a round or oval scan
  area): the image is complete without it (sparse). Any other frame missing (a performance
  mode scan, which covers its whole grid, stopped early; a frame refused, which was meant
  for some cell) closes it as partial: incomplete.
  When frames are missing it first waits until none arrived for `finalize_grace_s`:
  ImSwitch calls it from its workflow thread while its frame saver may still hold the
  area's last frames. (A normal-mode scan the user stops is never finalized by ImSwitch:
  the agent's abandoned-experiment policy closes it as partial.)

Threads: ImSwitch calls `write_frame` from its frame-saver thread and `finalize` from its
workflow thread. A writer's calls are serialized by the writer's own lock, held through the
call's I/O: that is what keeps a frame from racing its image's close. Writers share nothing
but the session (its edge port is safe for several threads).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import numpy as np

from tilebridge_imswitch import frames, layout, manifest
from tilebridge_imswitch.config import WriterConfig, paths_of
from tilebridge_imswitch.images import Images, chunk_info
from tilebridge_imswitch.placement import Channels, Grid, ZPlanes
from tilebridge_imswitch.port import Edge, LocalTarget, Progress
from tilebridge_imswitch.root import Session, session
from tilebridge_imswitch.settings import AdapterSettings, connection_targets, merged
from tilebridge_protocol.errors import PermanentError, TilebridgeError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, utcnow

log = logging.getLogger(__name__)


@dataclass
class _Held:
    """A frame waiting for the channel names (performance mode)."""

    planes: list[np.ndarray[Any, Any]]
    facts: frames.FrameFacts
    index: int
    channel: int
    z: int


class OMEWriter:
    """ImSwitch's `OMEWriter(file_paths, tile_shape, grid_shape, grid_geometry, config, ...)`.

    `edge` and `settings` (keyword only, for tests and embedding) replace the process's
    session (`root`)."""

    def __init__(
        self,
        file_paths: Any,
        tile_shape: tuple[int, int],
        grid_shape: tuple[int, int],
        grid_geometry: tuple[float, float, float, float],
        config: Any,
        logger: Any = None,
        isRGB: bool = False,  # noqa: N803 - ImSwitch's name
        omero_connection_params: Any = None,
        shared_omero_key: str | None = None,
        well_metadata: dict[str, Any] | None = None,
        image_name: str | None = None,
        *,
        edge: Edge | None = None,
        settings: AdapterSettings | None = None,
    ) -> None:
        current = session()
        self._session: Session = current
        self._settings = settings or current.settings
        self._edge = edge or current.edge
        self.file_paths = file_paths
        self.config = config
        self.logger = logger or log
        self.isRGB = bool(isRGB)
        self.shared_omero_key = shared_omero_key
        self.well_metadata = dict(well_metadata) if well_metadata else None
        self.tile_shape = tuple(tile_shape)
        self.grid_shape, self.grid_geometry = tuple(grid_shape), tuple(grid_geometry)
        self._cfg = WriterConfig.of(config)
        base_dir, _ = paths_of(file_paths)
        self._folder = base_dir.parent
        self._targets = merged(connection_targets(omero_connection_params), current.targets)
        self._area = image_name
        folder = self._folder
        self._stem = current.take_stem(
            folder, manifest.safe_name(base_dir.name), lambda name: layout.taken(folder, name)
        )
        self.store: str | None = (
            str(layout.zarr_store(folder, self._stem))
            if self._cfg.write_zarr and self._settings.local_files
            else None
        )
        self._channels = Channels(self._cfg.n_channels, self._cfg.channel_names)
        self._z = ZPlanes(self._cfg.n_z_planes)
        self._grid: Grid | None = None
        self._rgb: bool | None = None
        self._images = Images(self._edge, self._settings.retry_for_s, self.logger)
        self._held: list[_Held] = []
        self._extras: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._last_frame = time.monotonic()
        self._finalized = False
        self._sparse = False
        self.frames_refused = 0
        self.last_refusal: str | None = None
        for warning in self._cfg.warnings(self._settings.stream_to_server):
            self.logger.warning(f"tilebridge: {warning}")

    # -- ImSwitch's API ----------------------------------------------------------------------

    def write_frame(self, frame: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write one frame; returns the live view's chunk info (`{}` without a Zarr store)."""
        with self._lock:
            self._last_frame = time.monotonic()
            if self._finalized:
                raise self._refused(
                    PermanentError(f"{self._stem} is finalized: a frame came after finalize()")
                )
            try:
                return self._write(frame, frames.facts(metadata))
            except TilebridgeError as exc:
                raise self._refused(exc) from None

    def finalize(self) -> None:
        """Close every image with the frames that exist; safe to call again."""
        if self._missing():
            self._wait_for_quiet()
        with self._lock:
            if self._finalized:
                return
            self._finalized = True
            if self._held:
                self._channels.settle()
                self._open_held()
            # A refused frame was meant for some cell: then no empty cell is known unplanned.
            self._images.close_all(self._sparse and not self.frames_refused)
            if not self._images.by_time:
                self.logger.warning(f"tilebridge: {self._stem} got no frames; nothing written")
            self._session.release_stem(self._folder, self._stem)

    def abort(self) -> None:
        """Stop: no more frames; local files are removed (the server keeps what it got)."""
        with self._lock:
            self._finalized = True
            self._images.abort()

    def get_zarr_url(self) -> str | None:
        return self.store

    def get_omero_image_id(self) -> int | None:
        ids = self._omero_ids()
        return ids[0] if ids else None

    def get_omero_dataset_id(self) -> int | None:
        ids = self._omero_ids()
        return ids[1] if ids else None

    @classmethod
    def cleanup_shared_omero_uploaders(cls, key: str | None = None, logger: Any = None) -> None:
        """ImSwitch's: nothing to clean up here (the server writes OMERO)."""
        del key, logger

    # -- tilebridge's additions --------------------------------------------------------------

    @property
    def manifests(self) -> list[OpenManifest]:
        """The images this writer opened (one per time point), as the server got them."""
        with self._lock:
            return [image.manifest for image in self._images.by_time.values()]

    @property
    def image_ids(self) -> list[UUID]:
        return [m.image_id for m in self.manifests]

    def progress(self) -> list[Progress]:
        """Per image (one per time point): every target's state."""
        return [self._edge.progress(image_id) for image_id in self.image_ids]

    # -- the work ----------------------------------------------------------------------------

    def _write(self, frame: Any, facts: frames.FrameFacts) -> dict[str, Any]:
        if self._rgb is None:
            self._rgb = self.isRGB or frames.looks_rgb(frame)
        planes = frames.planes(frame, self._rgb)
        grid = self._grid_for(planes[0])
        index = grid.locate(facts.x_um, facts.y_um)
        channel = self._channels.index(facts.channel_index, facts.channel)
        z = self._z.index(facts.z_index, facts.z_um, index, channel)
        if self._extras is None:
            self._extras = facts.extras
        # Normal mode numbers its frames within an area, which may be round or oval (grid
        # cells never planned); performance mode scans the whole grid and numbers none.
        self._sparse |= facts.tile_index is not None
        held = _Held(planes, facts, index, channel, z)
        if self._channels.names is None:
            # Performance mode: wait for every channel's name, at most one frame per channel
            # (ImSwitch takes all channels at a position before it moves on).
            self._held.append(held)
            if len(self._held) < self._channels.count:
                return {}
            self._channels.settle()
            return self._open_held()  # the last of them is this frame
        if self._held:
            self._open_held()
        return self._put(held)

    def _put(self, held: _Held) -> dict[str, Any]:
        facts, first = held.facts, held.planes[0]
        image = self._images.get(
            facts.time_index, lambda: self._manifest(facts, first), self._local()
        )
        samples = len(held.planes)
        landed = True
        for s, pixels in enumerate(held.planes):
            key = TileKey(held.index, held.z, held.channel * samples + s, 0)
            meta = frames.plane_meta(facts, image.manifest.acquired_at)
            landed &= self._images.put(image, key, pixels, meta).landed is not False
        if not landed:
            # The live view reads the store as soon as it is told: tell it only what is there.
            self.logger.warning(
                "tilebridge: the Zarr store did not take a frame in time; the live view is "
                "not told about it"
            )
            return {}
        return self._chunk_info(held)

    def _manifest(self, facts: frames.FrameFacts, first: np.ndarray[Any, Any]) -> OpenManifest:
        # The image starts when its first frame was taken, if the frame says when.
        return manifest.manifest(
            self._spec(facts.time_index),
            image_id=uuid4(),
            time_point=facts.time_index,
            dtype=frames.pixel_type(first),
            tile_shape=(first.shape[0], first.shape[1]),
            acquired_at=facts.timestamp or utcnow(),
            extras=self._extras or {},
        )

    def _spec(self, time_point: int) -> manifest.ImageSpec:
        names = self._channels.names
        assert names is not None, "images open once the channel names are known"
        others = [t for t in self._images.by_time if t != time_point]
        stem = self._stem if not others else f"{self._stem}_t{time_point:04d}"
        base_dir = paths_of(self.file_paths)[0]
        key_values = self._targets.key_values() | manifest.writer_key_values(
            base_dir, self._area, self.shared_omero_key, self.well_metadata
        )
        well = manifest.well_of(self.well_metadata)
        s = self._settings
        experiment = manifest.experiment_name(base_dir)
        return manifest.ImageSpec(
            experiment=experiment,
            image_name=stem,
            project=s.project,
            dataset=s.dataset or (well.plate if well else experiment),
            grid=self._grid or self._grid_for(None),
            config=self._cfg,
            rgb=bool(self._rgb),
            channel_names=names,
            well=well,
            key_values=key_values,
            omero_project_id=self._targets.project_id or None,
            omero_dataset_id=self._targets.dataset_id or None,
        )

    def _open_held(self) -> dict[str, Any]:
        """Write the frames that waited for the channel names; the chunk info of the last."""
        held, self._held = self._held, []
        info: dict[str, Any] = {}
        for frame in held:
            info = self._put(frame)
        return info

    # -- helpers -----------------------------------------------------------------------------

    def _grid_for(self, first: np.ndarray[Any, Any] | None) -> Grid:
        if self._grid is None:
            height, width = first.shape[:2] if first is not None else self.tile_shape[:2]
            extent = (width * self._cfg.pixel_size_um, height * self._cfg.pixel_size_um)
            self._grid = Grid.of(self.grid_shape, self.grid_geometry, extent)  # type: ignore[arg-type]
        return self._grid

    def _chunk_info(self, held: _Held) -> dict[str, Any]:
        if self.store is None:
            return {}
        image = self._images.by_time[held.facts.time_index]
        c = held.channel * len(held.planes)
        cell = self._grid_for(None).cell(held.index)
        return chunk_info(image, held.index, held.z, c, held.channel, cell, held.facts.time_index)

    def _local(self) -> list[LocalTarget]:
        return layout.targets(self._cfg, self._folder) if self._settings.local_files else []

    def _missing(self) -> bool:
        with self._lock:
            if self._finalized:
                return False
            return bool(self._held) or self._images.incomplete()

    def _wait_for_quiet(self) -> None:
        grace = self._settings.finalize_grace_s
        while True:
            with self._lock:
                quiet_for = time.monotonic() - self._last_frame
            if quiet_for >= grace:
                return
            time.sleep(min(0.05, grace - quiet_for))

    def _omero_ids(self) -> tuple[int, int] | None:
        for image_id in self.image_ids:
            ids = self._edge.progress(image_id).omero_ids
            if ids is not None:
                return ids
        return None

    def _refused(self, exc: TilebridgeError) -> TilebridgeError:
        self.frames_refused += 1
        self.last_refusal = str(exc)
        self.logger.error(f"tilebridge: frame refused: {exc}")
        return exc

"""ImSwitch's OMEWriter, backed by tilebridge: local OME-TIFF / OME-Zarr / stitched TIFF and the
stream to the server (which writes OMERO), in any combination.

The acquisition thread only validates a frame, hands it to the agent's durable disk buffer
(the server stream) and queues it for the local backends. Each local backend has its own
worker thread, so a slow or failing backend never holds up the camera or the others; frames
not yet written by every local backend are bounded in bytes (`max_bytes_in_flight`), and
`write_frame` blocks only when that bound is reached. A backend that fails is recorded with
what it lost and the others carry on; its partial output is removed (that gives a full disk
its space back for the others).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from uuid import UUID, uuid4

import numpy as np
from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from edge_agent.agent import EdgeAgent
from edge_agent.api import FrameMetadata
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.framing import Codec
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    ImageState,
    Layout,
    Name,
    OpenManifest,
    PixelSize,
    PixelType,
    StagePosition,
    Text,
    utcnow,
)
from tilebridge_protocol.status import BackendProgress, DeviceStatus, Liveness
from tilebridge_storage.base import StorageBackend

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_FRAMES = 1_000_000
"""Frames per experiment; bounds the bookkeeping (and the close manifest) of one image."""
SERVER = "omero"
"""Status name of the stream to the server (`write_omero`)."""
LOCAL_BACKENDS: dict[str, tuple[str, str, str]] = {
    # status name: (config flag, module, class), imported only when enabled
    "ome_tiff": ("write_tiff", "tilebridge_storage.ome_tiff", "OmeTiffBackend"),
    "ome_zarr": ("write_zarr", "tilebridge_storage.ome_zarr", "OmeZarrBackend"),
    "stitched_tiff": (
        "write_stitched_tiff",
        "tilebridge_storage.stitched_tiff",
        "StitchedTiffBackend",
    ),
}


class Compression(StrEnum):
    NONE = "none"
    ZSTD = "zstd"


class OMEWriterConfig(BaseModel):
    """What to write and how to send it; mirrors ImSwitch's OMEWriterConfig flags."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    write_tiff: bool = True
    """One OME-TIFF per stage position (tiles as acquired)."""
    write_zarr: bool = False
    """An OME-Zarr mosaic with a multiscale pyramid."""
    write_stitched_tiff: bool = False
    """A stitched, pyramidal TIFF of the mosaic."""
    write_omero: bool = True
    """Stream to the server through the durable disk buffer; the server writes OMERO."""
    max_bytes_in_flight: int = Field(default=256 * MiB, ge=MiB, le=1024 * 1024 * MiB)
    """Bytes of frames queued for, but not yet written by, the local backends."""
    omero_project: Name = "imswitch"
    omero_dataset: Name = "scans"
    layout: Layout = Layout.MOSAIC
    compression: Compression = Compression.NONE
    """Chunks on the wire: zstd costs CPU on the Pi and saves link bandwidth."""
    bandwidth_limit_mbps: float | None = Field(default=None, gt=0, le=100_000)
    """Cap on the upload rate (after compression); None: no cap."""
    output_dir: Path = Path("/var/lib/tilebridge-edge/output")
    """Local backends write under `<output_dir>/<backend>/`."""

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("output_dir must be an absolute path")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OMEWriterConfig:
        if not self.targets:
            raise ValueError(
                "write_tiff, write_zarr, write_stitched_tiff, write_omero are all false: "
                "enable at least one"
            )
        mosaics = [f for f in ("write_zarr", "write_stitched_tiff") if getattr(self, f)]
        if self.layout is Layout.PER_TILE and mosaics:
            raise ValueError(
                f"layout per_tile keeps positions apart, but {' and '.join(mosaics)} "
                "stitch a mosaic: turn them off or use layout mosaic"
            )
        return self

    @property
    def targets(self) -> list[str]:
        local = [name for name, (flag, *_) in LOCAL_BACKENDS.items() if getattr(self, flag)]
        return [*local, SERVER] if self.write_omero else local

    @property
    def codec(self) -> Codec:
        return Codec.ZSTD if self.compression is Compression.ZSTD else Codec.RAW

    @property
    def bandwidth_limit_bytes_per_s(self) -> int | None:
        mbps = self.bandwidth_limit_mbps
        return None if mbps is None else max(1, round(mbps * 1_000_000 / 8))

    @classmethod
    def for_agent(cls, agent: EdgeAgent, **values: Any) -> OMEWriterConfig:
        """Defaults that keep the agent's own transport settings."""
        limit = agent.settings.bandwidth_limit_bytes_per_s
        base: dict[str, Any] = {
            "compression": "zstd" if agent.settings.codec is Codec.ZSTD else "none",
            "bandwidth_limit_mbps": None if limit is None else limit * 8 / 1_000_000,
        }
        return cls(**(base | values))


def apply_transport(agent: EdgeAgent, config: OMEWriterConfig) -> None:
    """Compression and the cap belong to the agent (they apply to everything it sends); the
    publisher reads its settings per message, so a swap takes effect on the next chunk."""
    update = {
        "codec": config.codec,
        "bandwidth_limit_bytes_per_s": config.bandwidth_limit_bytes_per_s,
    }
    if all(getattr(agent.settings, k) == v for k, v in update.items()):
        return
    settings = agent.settings.model_copy(update=update)
    agent.settings = settings
    agent.publisher.settings = settings


# -- the experiment manifest ----------------------------------------------------------------


class Grid(BaseModel):
    """A raster (or snake) scan, as ImSwitch describes it: grid shape and geometry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: int = Field(ge=1, le=10_000)
    rows: int = Field(ge=1, le=10_000)
    x_start_um: float = Field(default=0.0, allow_inf_nan=False)
    y_start_um: float = Field(default=0.0, allow_inf_nan=False)
    x_step_um: float = Field(gt=0, allow_inf_nan=False)
    y_step_um: float = Field(gt=0, allow_inf_nan=False)
    snake: bool = False
    """Odd rows run right to left; tile indices stay in acquisition order."""

    def positions(self) -> list[StagePosition]:
        out: list[StagePosition] = []
        for r in range(self.rows):
            for i in range(self.columns):
                col = self.columns - 1 - i if self.snake and r % 2 else i
                out.append(
                    StagePosition(
                        index=len(out),
                        x_um=self.x_start_um + col * self.x_step_um,
                        y_um=self.y_start_um + r * self.y_step_um,
                    )
                )
        return out


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    x_um: float = Field(allow_inf_nan=False)
    y_um: float = Field(allow_inf_nan=False)
    z_um: float = Field(default=0.0, allow_inf_nan=False)


class ExperimentSpec(BaseModel):
    """What `start_experiment` needs; becomes the image's OpenManifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: Name
    image_name: Name | None = None
    """Defaults to the experiment name."""
    image_id: UUID | None = None
    """Set to resume an interrupted acquisition of the same image; new otherwise."""
    tile_width: int = Field(ge=1, le=65536)
    tile_height: int = Field(ge=1, le=65536)
    dtype: PixelType = PixelType.UINT16
    pixel_size_um: float = Field(gt=0, allow_inf_nan=False)
    pixel_size_y_um: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    z_step_um: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    grid: Grid | None = None
    positions: list[Point] | None = Field(default=None, min_length=1, max_length=100_000)
    channels: list[Name] = Field(default_factory=list, max_length=64)
    size_c: int | None = Field(default=None, ge=1, le=64)
    """Defaults to the number of channel names, or 1."""
    size_z: int = Field(default=1, ge=1, le=10_000)
    size_t: int = Field(default=1, ge=1, le=100_000)
    key_values: dict[Name, Text] = Field(default_factory=dict, max_length=256)
    tags: list[Name] = Field(default_factory=list, max_length=64)
    acquired_at: AwareDatetime | None = None
    project: Name | None = None
    """Overrides the config's omero_project for this experiment."""
    dataset: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if (self.grid is None) == (self.positions is None):
            raise ValueError("give exactly one of grid or positions")
        count = len(self.positions) if self.positions else 0
        if self.grid is not None:
            count = self.grid.columns * self.grid.rows
        if count > 100_000:
            raise ValueError(f"grid has {count} positions, at most 100000")
        size_c = self.size_c or max(1, len(self.channels))
        if self.channels and len(self.channels) != size_c:
            raise ValueError(f"{len(self.channels)} channel names for size_c={size_c}")
        frames = count * size_c * self.size_z * self.size_t
        if frames > MAX_FRAMES:
            raise ValueError(f"{frames} frames in one experiment, at most {MAX_FRAMES}")
        return self

    def manifest(self, config: OMEWriterConfig) -> OpenManifest:
        if self.grid is not None:
            positions = self.grid.positions()
        else:
            points = self.positions or []
            positions = [StagePosition(index=i, **p.model_dump()) for i, p in enumerate(points)]
        return OpenManifest(
            image_id=self.image_id or uuid4(),
            experiment=self.experiment,
            project=self.project or config.omero_project,
            dataset=self.dataset or config.omero_dataset,
            image_name=self.image_name or self.experiment,
            layout=config.layout,
            tile_width=self.tile_width,
            tile_height=self.tile_height,
            size_z=self.size_z,
            size_c=self.size_c or max(1, len(self.channels)),
            size_t=self.size_t,
            dtype=self.dtype,
            positions=tuple(positions),
            pixel_size=PixelSize(
                x_um=self.pixel_size_um,
                y_um=self.pixel_size_y_um or self.pixel_size_um,
                z_um=self.z_step_um,
            ),
            channels=tuple(self.channels),
            acquired_at=self.acquired_at or utcnow(),
            key_values=dict(self.key_values),
            tags=tuple(self.tags),
        )


def _alias(name: str) -> AliasChoices:
    return AliasChoices(f"{name}_um", name)


class FrameInfo(BaseModel):
    """What the acquisition knows about one frame. ImSwitch's metadata dict is accepted as
    is (`x`, `y`, `z` in µm, `z_index`, `channel_index`, `time_index`, `illuminationChannel`,
    `runningNumber`, `illuminationValue`); without `tile_index` the frame goes to the planned
    position nearest its stage x/y."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    tile_index: int | None = Field(default=None, ge=0)
    z_index: int = Field(default=0, ge=0)
    channel_index: int | None = Field(default=None, ge=0)
    time_index: int = Field(default=0, ge=0)
    x_um: float | None = Field(default=None, allow_inf_nan=False, validation_alias=_alias("x"))
    y_um: float | None = Field(default=None, allow_inf_nan=False, validation_alias=_alias("y"))
    z_um: float | None = Field(default=None, allow_inf_nan=False, validation_alias=_alias("z"))
    pixel_size_um: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    channel: str | None = Field(
        default=None,
        max_length=128,
        validation_alias=AliasChoices("channel", "illuminationChannel"),
    )
    exposure_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    timestamp: datetime | None = None
    running_number: int | None = Field(
        default=None, validation_alias=AliasChoices("running_number", "runningNumber")
    )
    illumination_value: float | None = Field(
        default=None,
        allow_inf_nan=False,
        validation_alias=AliasChoices("illumination_value", "illuminationValue"),
    )

    @classmethod
    def of(cls, metadata: FrameInfo | FrameMetadata | Mapping[str, Any]) -> FrameInfo:
        if isinstance(metadata, FrameInfo):
            return metadata
        if isinstance(metadata, FrameMetadata):
            return cls(
                tile_index=metadata.tile_index, z_index=metadata.z,
                channel_index=metadata.c, time_index=metadata.t, x_um=metadata.x_um,
                y_um=metadata.y_um, z_um=metadata.z_um, exposure_ms=metadata.exposure_ms,
            )  # fmt: skip
        return cls.model_validate(dict(metadata))


# -- progress -------------------------------------------------------------------------------


class ExperimentProgress(BaseModel):
    model_config = ConfigDict(frozen=True)

    image_id: UUID
    experiment: str
    image_name: str
    state: Literal["acquiring", "finalizing", "finalized", "aborted"]
    frames_total: int
    frames_received: int
    backends: dict[str, BackendProgress]
    """Per target: frames written (for `omero`, acknowledged by the server), failures."""
    warnings: list[str] = Field(default_factory=list)


# -- the writer -----------------------------------------------------------------------------


class OMEWriter:
    """One acquisition at a time: `start_experiment`, `write_frame` per frame, `finalize`.

    `backends` replaces the configured local backends (tests, custom storage).
    """

    def __init__(
        self,
        agent: EdgeAgent,
        config: OMEWriterConfig | None = None,
        backends: Mapping[str, StorageBackend] | None = None,
    ) -> None:
        self.agent = agent
        self.config = config if config is not None else OMEWriterConfig.for_agent(agent)
        self._backends = backends
        self._lock = threading.Lock()
        self.current: _Experiment | None = None
        self.last: _Experiment | None = None
        apply_transport(agent, self.config)
        _track(agent, self)

    @property
    def manifest(self) -> OpenManifest:
        return self._experiment().manifest

    def start_experiment(
        self, spec: ExperimentSpec | Mapping[str, Any] | None = None, **fields: Any
    ) -> OpenManifest:
        """Open the image everywhere; the manifest's `image_id` names the experiment."""
        spec = (
            spec
            if isinstance(spec, ExperimentSpec)
            else ExperimentSpec(**dict(spec or {}), **fields)
        )
        with self._lock:
            if self.current is not None and self.current.state == "acquiring":
                raise PermanentError(
                    f"experiment {self.current.manifest.experiment} is still acquiring; "
                    "finalize or abort it first"
                )
            apply_transport(self.agent, self.config)
            manifest = spec.manifest(self.config)
            self.current = self.last = _Experiment(
                self.agent, self.config, manifest, self._factories()
            )
            _track(self.agent, self)
            return manifest

    def write_frame(
        self,
        frame: np.ndarray[Any, Any],
        metadata: FrameInfo | FrameMetadata | Mapping[str, Any],
        *,
        owned: bool = False,
    ) -> bool:
        """Hand one frame to every target; False if this frame was already written.

        Returns once the frame is in the durable disk buffer and queued for the local
        backends; blocks only while `max_bytes_in_flight` is reached. `owned=True` says the
        caller will never touch `frame` again, which saves a copy.
        """
        return self._experiment().write(frame, FrameInfo.of(metadata), owned)

    def key_of(self, metadata: FrameInfo | FrameMetadata | Mapping[str, Any]) -> TileKey:
        """The tile a frame with this metadata is (PermanentError if it is none)."""
        return self._experiment().key(FrameInfo.of(metadata))

    def finalize(self, timeout: float | None = None) -> ExperimentProgress:
        """Close the image: the server stream gets its close manifest, the local backends
        finish their files (waited for up to `timeout` seconds; None waits for good)."""
        experiment = self._experiment()
        experiment.finalize(timeout)
        with self._lock:
            if self.current is experiment:
                self.current = None
        return experiment.progress()

    def abort(self) -> None:
        """Stop writing locally and discard partial local output (the buffered frames of the
        server stream are kept and still sent)."""
        experiment = self._experiment()
        experiment.abort()
        with self._lock:
            if self.current is experiment:
                self.current = None

    def progress(self) -> ExperimentProgress | None:
        experiment = self.current or self.last
        return experiment.progress() if experiment else None

    def _experiment(self) -> _Experiment:
        experiment = self.current or self.last
        if experiment is None:
            raise PermanentError("no experiment started")
        return experiment

    def _factories(self) -> dict[str, Callable[[], StorageBackend]]:
        if self._backends is not None:
            return {name: _constant(backend) for name, backend in self._backends.items()}
        return {
            name: _importer(name, self.config.output_dir / name)
            for name in self.config.targets
            if name != SERVER
        }


def _constant(backend: StorageBackend) -> Callable[[], StorageBackend]:
    return lambda: backend


def _importer(name: str, root: Path) -> Callable[[], StorageBackend]:
    # Imported in the worker, so a backend that cannot load fails alone, like any other fault.
    _, module, cls = LOCAL_BACKENDS[name]

    def build() -> StorageBackend:
        backend: StorageBackend = getattr(importlib.import_module(module), cls)(root)
        return backend

    return build


class _Budget:
    """Bytes of frames held for the local backends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            # A frame bigger than the whole budget still goes, alone.
            while self.used and self.used + nbytes > self.limit:
                self._cond.wait()
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


class _Frame:
    """One frame shared by every local worker; its bytes return to the budget when the
    last of them is done with it."""

    def __init__(self, key: TileKey, pixels: np.ndarray[Any, Any], refs: int, budget: _Budget):
        self.key = key
        self.pixels = pixels
        self._refs = refs
        self._budget = budget
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._budget.release(self.pixels.nbytes)


_FINISH, _ABORT = "finish", "abort"


class _Worker:
    """Writes one local backend on its own thread."""

    def __init__(
        self, name: str, factory: Callable[[], StorageBackend], device: str, manifest: OpenManifest
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.state: Literal["writing", "finished", "failed"] = "writing"
        self.written = 0
        self.lost = 0
        self.error: str | None = None
        self.location: str | None = None
        self._counts = threading.Lock()
        self._queue: queue.SimpleQueue[_Frame | str] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(factory, device), name=f"omewriter-{name}", daemon=True
        )
        self._thread.start()

    def put(self, frame: _Frame) -> None:
        self._queue.put(frame)

    def count_lost(self) -> None:
        with self._counts:
            self.lost += 1

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def close(self, how: str) -> None:
        self._queue.put(how)

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def progress(self) -> BackendProgress:
        return BackendProgress(
            image_id=self.manifest.image_id, state=self.state,
            frames_total=self.manifest.tile_count, frames_written=self.written,
            frames_lost=self.lost, error=self.error, location=self.location,
        )  # fmt: skip

    def _run(self, factory: Callable[[], StorageBackend], device: str) -> None:
        backend = writer = None
        try:
            backend = factory()
            writer = backend.open_image(device, self.manifest)
        except Exception as exc:
            self._fail(exc, None)
        while True:
            item = self._queue.get()
            if isinstance(item, str):
                break
            try:
                if writer is None:
                    self.count_lost()
                else:
                    writer.write_tile(item.key, item.pixels)
                    self.written += 1
            except Exception as exc:
                self.count_lost()
                self._fail(exc, writer)
                writer = None
            finally:
                item.release()
        try:
            if writer is not None and item == _FINISH:
                self.location = writer.finish().location
                self.state = "finished"
            elif writer is not None:
                self._fail(None, writer)
        except Exception as exc:
            self._fail(exc, writer)
        finally:
            if backend is not None:
                backend.close()

    def _fail(self, exc: Exception | None, writer: Any) -> None:
        if exc is not None:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("%s failed after %d frames: %s", self.name, self.written, self.error)
        else:
            self.error = "aborted"
        self.state = "failed"
        # What it wrote goes with its partial output: nothing of this image remains there.
        with self._counts:
            self.lost += self.written
            self.written = 0
        if writer is not None:
            try:
                writer.abort()
            except Exception:
                log.exception("%s: abort after failure", self.name)


class _Experiment:
    def __init__(
        self,
        agent: EdgeAgent,
        config: OMEWriterConfig,
        manifest: OpenManifest,
        factories: Mapping[str, Callable[[], StorageBackend]],
    ) -> None:
        self.agent = agent
        self.manifest = manifest
        self.state: Literal["acquiring", "finalizing", "finalized", "aborted"] = "acquiring"
        self.received: set[TileKey] = set()
        self.warnings: list[str] = []
        self.to_server = config.write_omero
        self.server_handed = 0
        self.server_lost = 0
        self.server_error: str | None = None
        self._lock = threading.Lock()
        self._budget = _Budget(config.max_bytes_in_flight)
        self._centres = np.array([(p.x_um, p.y_um) for p in manifest.positions])
        if self.to_server:
            try:
                agent.open_image(manifest)
            except PermanentError:
                raise  # e.g. this image_id was opened with another manifest: the caller's error
            except Exception as exc:
                self._server_failed(exc)
        device = agent.device
        self.workers = [_Worker(n, f, device, manifest) for n, f in factories.items()]

    # -- acquisition ------------------------------------------------------------------------

    def write(self, frame: np.ndarray[Any, Any], info: FrameInfo, owned: bool) -> bool:
        with self._lock:
            if self.state != "acquiring":
                raise PermanentError(
                    f"experiment {self.manifest.experiment} is {self.state}; no more frames"
                )
            key = self.key(info)
            if key in self.received:
                return False
            pixels = self._pixels(frame, owned)
            live = [w for w in self.workers if w.state == "writing"]
            for w in self.workers:
                if w not in live:
                    w.count_lost()
            if live:
                self._budget.acquire(pixels.nbytes)
                shared = _Frame(key, pixels, len(live), self._budget)
                for w in live:
                    w.put(shared)
            if self.to_server and self.server_error is None:
                try:
                    self.agent.write_tile(self.manifest.image_id, key, pixels)
                    self.server_handed += 1
                except Exception as exc:
                    self.server_lost += 1
                    self._server_failed(exc)
            elif self.to_server:
                self.server_lost += 1
            self.received.add(key)
            return True

    def finalize(self, timeout: float | None) -> None:
        with self._lock:
            if self.state == "acquiring":
                missing = [k for k in self.manifest.tile_keys() if k not in self.received]
                if missing:
                    k = missing[0]
                    raise PermanentError(
                        f"cannot finalize {self.manifest.experiment}: {len(missing)} of "
                        f"{self.manifest.tile_count} frames not written (first: tile_index="
                        f"{k.index} z_index={k.z} channel_index={k.c} time_index={k.t})"
                    )
                self.state = "finalizing"
                if self.to_server and self.server_error is None:
                    try:
                        self.agent.finalize(self.manifest.image_id)
                    except Exception as exc:
                        self._server_failed(exc)
                for w in self.workers:
                    w.close(_FINISH)
            elif self.state != "finalizing":
                return
        if all([w.join(timeout) for w in self.workers]):
            self.state = "finalized"

    def abort(self) -> None:
        with self._lock:
            if self.state in ("acquiring", "finalizing"):
                self.state = "aborted"
                for w in self.workers:
                    w.close(_ABORT)

    # -- progress ---------------------------------------------------------------------------

    def progress(self) -> ExperimentProgress:
        backends = {w.name: w.progress() for w in self.workers}
        if self.to_server:
            backends[SERVER] = self._server_progress()
        state = self.state
        if state == "finalizing" and all(w.done for w in self.workers):
            state = "finalized"
        return ExperimentProgress(
            image_id=self.manifest.image_id, experiment=self.manifest.experiment,
            image_name=self.manifest.image_name, state=state,
            frames_total=self.manifest.tile_count, frames_received=len(self.received),
            backends=backends, warnings=list(self.warnings),
        )  # fmt: skip

    def _server_progress(self) -> BackendProgress:
        image_id = self.manifest.image_id
        ack = self.agent.wait_done([image_id], 0).get(image_id)
        buffer = self.agent.buffer
        pending = _count(buffer.images_dir / str(image_id) / "tiles", ".tile")
        rejected = _count(buffer.rejected_dir / str(image_id), ".tile")
        acked = max(0, self.server_handed - pending - rejected)
        state: Literal["writing", "finished", "failed"] = "writing"
        error, location = self.server_error, None
        if ack is not None and ack.state is ImageState.COMPLETE:
            state, acked = "finished", self.manifest.tile_count
            location = "; ".join(f"{k}: {v}" for k, v in sorted(ack.locations.items()))
        elif ack is not None:
            state, error = "failed", f"server: {ack.reason}: {ack.detail}"
        elif self.server_error is not None:
            state = "failed"
        return BackendProgress(
            image_id=image_id, state=state, frames_total=self.manifest.tile_count,
            frames_written=acked, frames_lost=self.server_lost + rejected, error=error,
            location=location,
        )  # fmt: skip

    # -- internals --------------------------------------------------------------------------

    def _server_failed(self, exc: Exception) -> None:
        self.server_error = f"{type(exc).__name__}: {exc}"
        log.error("server stream of %s failed: %s", self.manifest.image_id, self.server_error)

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
        if info.x_um is None or info.y_um is None or len(self.warnings) >= 20:
            return
        planned = self.manifest.positions[index]
        off = math.hypot(info.x_um - planned.x_um, info.y_um - planned.y_um)
        if off > 1.0 + self.manifest.pixel_size.x_um:
            # The manifest (and so every output) keeps the planned position.
            self.warnings.append(
                f"tile {index} was acquired {off:.1f} µm from its planned position"
            )

    def _pixels(self, frame: np.ndarray[Any, Any], owned: bool) -> np.ndarray[Any, Any]:
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
        if not owned and self.workers and np.may_share_memory(pixels, data):
            # Workers read it later; the camera may reuse its buffer as soon as we return.
            pixels = pixels.copy()
        pixels.flags.writeable = False
        return pixels


def _count(folder: Path, suffix: str) -> int:
    try:
        return sum(1 for entry in os.scandir(folder) if entry.name.endswith(suffix))
    except FileNotFoundError:
        return 0


# -- the device status carries the current experiment's per-target progress ----------------

_writers: weakref.WeakKeyDictionary[EdgeAgent, OMEWriter] = weakref.WeakKeyDictionary()


def _track(agent: EdgeAgent, writer: OMEWriter) -> None:
    """Make `agent.status()` (the retained status topic) include `writer`'s progress.

    EdgeAgent has no hook for extra status, so its bound `status` is wrapped once per agent.
    """
    _writers[agent] = writer
    if getattr(agent, "_omewriter_status", False):
        return
    original = agent.status

    def status(state: Liveness = Liveness.ONLINE) -> DeviceStatus:
        base = original(state)
        current = _writers.get(agent)
        progress = current.progress() if current is not None else None
        if progress is None:
            return base
        return base.model_copy(update={"backends": progress.backends})

    agent.status = status  # type: ignore[method-assign]
    agent._omewriter_status = True  # type: ignore[attr-defined]

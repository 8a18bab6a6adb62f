"""What the acquisition front door takes and answers: the experiment spec, a frame's
metadata, and the answers (a started experiment, a frame's result, an experiment's
progress).

Shared by every entry point (the in-process `Acquisition`, the local fast path and its
client, the HTTP API), so all of them validate and answer the same way. This module imports
only pydantic and the wire protocol's models: the ImSwitch adapter and the fast-path client
import it without any server-side package.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    Color,
    Layout,
    Name,
    OpenManifest,
    PixelSize,
    PixelType,
    PlaneMeta,
    StagePosition,
    Text,
    Well,
)
from tilebridge_protocol.status import BackendProgress

MAX_FRAMES = 1_000_000
"""Frames per experiment; bounds the bookkeeping (and the close manifest) of one image."""
SERVER = "omero"
"""Status name of the stream to the server (it writes OMERO and its archive)."""


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


class LocalTarget(BaseModel):
    """A file backend on the Pi that gets every frame of the experiment.

    `kind` is a kind of `tilebridge_storage.registry` that writes into a folder (`ome_tiff`,
    `ome_zarr`, `stitched_tiff`, `archive`); it writes under `folder` (which a remote caller
    may choose only under the agent's `local_output_root`). `options` are passed to that
    backend's constructor (its keyword arguments); an unknown one is refused at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(min_length=1, max_length=64)
    folder: Path
    name: Name | None = None
    """Status name of the target; defaults to `kind` (give one to write a kind twice)."""
    options: dict[str, JsonValue] = Field(default_factory=dict, max_length=32)
    live: bool = False
    """A viewer reads this target after every frame (ImSwitch's live view reads its Zarr
    store as soon as `write_frame` returns): `write_frame` answers only once it has the
    frame (`FrameResult.landed`). Costs the target's write time on every frame."""

    @field_validator("folder")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("folder must be an absolute path")
        return value

    @property
    def label(self) -> str:
        return self.name or self.kind


class ExperimentSpec(BaseModel):
    """What `start` needs; becomes the image's OpenManifest.

    Resuming: give the `image_id` of an experiment this agent already has. Fields left out
    are taken from the stored experiment (so `acquired_at` may be omitted); a field given
    with another value than the stored one is refused (409) naming it."""

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
    """When the acquisition started; defaults to the first start's time (kept on resume)."""
    project: Name | None = None
    """Overrides the agent config's omero_project for this experiment."""
    dataset: Name | None = None
    layout: Layout | None = None
    """Defaults to the agent config's layout."""
    channel_colors: list[Color] = Field(default_factory=list, max_length=64)
    time_interval_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    first_time_point: int = Field(default=0, ge=0, le=10_000_000)
    well: Well | None = None
    omero_project_id: int | None = Field(default=None, ge=1)
    omero_dataset_id: int | None = Field(default=None, ge=1)
    """These six go to the open manifest as they are (see its fields)."""
    targets: list[LocalTarget] | None = Field(default=None, max_length=16)
    """Local files to write; None: the agent config's flags (write_tiff, ...) decide."""
    server: bool | None = None
    """Stream to the server; None: the agent config's write_omero decides."""

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
        if self.targets is not None:
            labels = [t.label for t in self.targets]
            if len(set(labels)) != len(labels) or SERVER in labels:
                raise ValueError(f"targets need distinct names other than {SERVER!r}: {labels}")
        return self

    @property
    def tile_bytes(self) -> int:
        return self.tile_width * self.tile_height * self.dtype.numpy.itemsize

    @property
    def frame_count(self) -> int:
        count = self.grid.columns * self.grid.rows if self.grid else len(self.positions or [])
        return count * (self.size_c or max(1, len(self.channels))) * self.size_z * self.size_t

    def manifest(self) -> OpenManifest:
        """The wire manifest of a resolved spec (image_id, acquired_at, project, dataset and
        layout set; `Acquisition.start` resolves them)."""
        if None in (self.image_id, self.acquired_at, self.project, self.dataset, self.layout):
            raise ValueError("resolve image_id, acquired_at, project, dataset, layout first")
        if self.grid is not None:
            positions = self.grid.positions()
        else:
            points = self.positions or []
            positions = [StagePosition(index=i, **p.model_dump()) for i, p in enumerate(points)]
        return OpenManifest(
            image_id=self.image_id,
            experiment=self.experiment,
            project=self.project,
            dataset=self.dataset,
            image_name=self.image_name or self.experiment,
            layout=self.layout,
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
            acquired_at=self.acquired_at,
            key_values=dict(self.key_values),
            tags=tuple(self.tags),
            channel_colors=tuple(self.channel_colors),
            time_interval_s=self.time_interval_s,
            first_time_point=self.first_time_point,
            well=self.well,
            omero_project_id=self.omero_project_id,
            omero_dataset_id=self.omero_dataset_id,
        )

    @classmethod
    def from_manifest(cls, manifest: OpenManifest, **fields: Any) -> ExperimentSpec:
        """The spec of an existing manifest (simulators, tests, tools that plan in manifests)."""
        values: dict[str, Any] = {
            "experiment": manifest.experiment,
            "image_name": manifest.image_name,
            "image_id": manifest.image_id,
            "tile_width": manifest.tile_width,
            "tile_height": manifest.tile_height,
            "dtype": manifest.dtype,
            "pixel_size_um": manifest.pixel_size.x_um,
            "pixel_size_y_um": manifest.pixel_size.y_um,
            "z_step_um": manifest.pixel_size.z_um,
            "positions": [Point(x_um=p.x_um, y_um=p.y_um, z_um=p.z_um) for p in manifest.positions],
            "channels": list(manifest.channels),
            "size_c": manifest.size_c,
            "size_z": manifest.size_z,
            "size_t": manifest.size_t,
            "key_values": dict(manifest.key_values),
            "tags": list(manifest.tags),
            "acquired_at": manifest.acquired_at,
            "project": manifest.project,
            "dataset": manifest.dataset,
            "layout": manifest.layout,
            "channel_colors": list(manifest.channel_colors),
            "time_interval_s": manifest.time_interval_s,
            "first_time_point": manifest.first_time_point,
            "well": manifest.well,
            "omero_project_id": manifest.omero_project_id,
            "omero_dataset_id": manifest.omero_dataset_id,
        }
        return cls(**(values | fields))


def _alias(name: str) -> AliasChoices:
    return AliasChoices(f"{name}_um", name)


class FrameInfo(BaseModel):
    """What the acquisition knows about one frame. ImSwitch's metadata dict is accepted as
    is (`x`, `y`, `z` in µm, `z_index`, `channel_index`, `time_index`, `illuminationChannel`,
    `runningNumber`, `illuminationValue`); without `tile_index` the frame goes to the planned
    position nearest its stage x/y. The measured x/y/z, `exposure_ms` and `timestamp` become
    the tile's `PlaneMeta` (stored with the planes by every target)."""

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
    timestamp: AwareDatetime | None = None
    running_number: int | None = Field(
        default=None, validation_alias=AliasChoices("running_number", "runningNumber")
    )
    illumination_value: float | None = Field(
        default=None,
        allow_inf_nan=False,
        validation_alias=AliasChoices("illumination_value", "illuminationValue"),
    )

    @classmethod
    def of(cls, metadata: FrameInfo | dict[str, Any] | None = None, **fields: Any) -> FrameInfo:
        """`metadata` (or a dict of it, ImSwitch's names allowed), with `fields` on top."""
        if isinstance(metadata, FrameInfo):
            if not fields:
                return metadata
            base = metadata.model_dump(exclude_unset=True)
        else:
            base = dict(metadata or {})
        return cls.model_validate(base | fields)

    @classmethod
    def at(cls, key: TileKey, **fields: Any) -> FrameInfo:
        """The frame of tile `key` (its position index and planes), with `fields` on top."""
        return cls(
            tile_index=key.index, z_index=key.z, channel_index=key.c, time_index=key.t, **fields
        )

    def plane(self, acquired_at: datetime) -> PlaneMeta | None:
        """What was measured, as the close manifest carries it (None: nothing was)."""
        delta = None if self.timestamp is None else (self.timestamp - acquired_at).total_seconds()
        meta = PlaneMeta(
            x_um=self.x_um, y_um=self.y_um, z_um=self.z_um, exposure_ms=self.exposure_ms,
            delta_t_s=delta,
        )  # fmt: skip
        return None if meta == PlaneMeta() else meta


FRAME_FIELDS = tuple(FrameInfo.model_fields)
"""FrameInfo's own names (ImSwitch's aliases are accepted too)."""
IMSWITCH_FIELDS = (
    "x", "y", "z", "z_index", "channel_index", "time_index", "illuminationChannel",
    "runningNumber", "illuminationValue",
)  # fmt: skip
"""The names of ImSwitch's frame metadata that tilebridge reads."""


def frame_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """What tilebridge reads of a metadata dict (ImSwitch adds keys of its own)."""
    known = {*FRAME_FIELDS, *IMSWITCH_FIELDS}
    return {k: v for k, v in metadata.items() if k in known}


class FrameResult(BaseModel):
    """The answer to one frame."""

    model_config = ConfigDict(frozen=True)

    accepted: bool
    """True: the frame is durable in the agent's spool now. False: it was accepted before
    (the same pixels): nothing changed; `reason` says so."""
    reason: str | None = None
    tile: tuple[int, int, int, int]
    """(tile_index, z_index, channel_index, time_index)."""
    frames_received: int
    landed: bool | None = None
    """With live targets (`LocalTarget.live`): True, every one of them has the frame now (a
    viewer that reads it sees it); False, one failed it or did not take it in time. None:
    the experiment has no live target."""

    @property
    def key(self) -> TileKey:
        return TileKey(*self.tile)


State = Literal["acquiring", "finalizing", "finalized", "aborted"]
"""`finalizing`: the close is queued, local targets are finishing their files."""
ServerState = Literal["off", "sending", "complete", "failed", "refused"]


class ExperimentProgress(BaseModel):
    """One experiment as the agent knows it; answers after restarts, and for
    `experiment_retention_s` after the server completed it."""

    model_config = ConfigDict(frozen=True)

    image_id: UUID
    experiment: str
    image_name: str
    state: State
    partial: bool = False
    """Closed with the frames it had (finalize --partial, or the abandoned policy)."""
    ended_by: str | None = None
    """Who ended it when it was not the client: e.g. `abandoned after 6.0 h idle`."""
    frames_total: int
    frames_received: int
    server: ServerState
    locations: dict[str, str] = Field(default_factory=dict)
    """Where the server stored the image, per backend (e.g. `omero:Image:42 dataset:7`)."""
    backends: dict[str, BackendProgress]
    """Per target: frames written (for `omero`, acknowledged by the server), failures."""
    warnings: list[str] = Field(default_factory=list)
    started_at: datetime
    last_frame_at: datetime | None = None


class StartedExperiment(BaseModel):
    """The answer to `start`: the complete stored spec and the plan a client needs."""

    model_config = ConfigDict(frozen=True)

    image_id: UUID
    resumed: bool
    """False: created now. True: this agent had it (the stored spec is authoritative)."""
    spec: ExperimentSpec
    """Every field resolved: image_id, acquired_at, project, dataset, layout, targets."""
    experiment: str
    acquired_at: datetime
    state: State
    frames_total: int
    frames_received: int
    tile_width: int
    tile_height: int
    dtype: PixelType
    tile_bytes: int
    """Exact byte size of every frame's pixels."""
    positions: list[StagePosition]
    """tile_index -> planned stage position."""

"""The experiment as ImSwitch describes it (a grid or a list of stage positions, channels,
z and time), turned into the image's OpenManifest."""

from __future__ import annotations

from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from edge_agent.writer.config import OMEWriterConfig
from tilebridge_protocol.messages import (
    Name,
    OpenManifest,
    PixelSize,
    PixelType,
    StagePosition,
    Text,
    utcnow,
)

MAX_FRAMES = 1_000_000
"""Frames per experiment; bounds the bookkeeping (and the close manifest) of one image."""


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

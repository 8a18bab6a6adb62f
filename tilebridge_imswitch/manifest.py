"""The image one ImSwitch writer's frames of one time point become. Pure logic.

One image per writer and time point (ImSwitch makes a writer per scan area and time point):
the writer's grid as positions, `size_t = 1` with `first_time_point` saying which time point
of the time-lapse it is, z planes and channels as configured (an RGB camera's frame is three
channels, R, G, B), the dtype and size of the frames themselves. Names are made safe for
OMERO and file systems (`safe_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from tilebridge_imswitch.config import DEFAULT_COLORS, WriterConfig
from tilebridge_imswitch.frames import RGB, RGB_COLORS, key_name
from tilebridge_imswitch.placement import Grid
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import OpenManifest, PixelSize, PixelType, Well

_UNSAFE = re.compile(r"[^A-Za-z0-9 _.,()+=@-]")
_ROW = re.compile(r"^[A-Za-z]{1,2}$")
MAX_KEY_VALUES = 256


def safe_name(text: str, fallback: str = "imswitch") -> str:
    """`text` as a protocol Name: unsafe characters as `_`, at most 128, starting with a
    letter or digit."""
    name = _UNSAFE.sub("_", text).lstrip(" _.,()+=@-")[:128].rstrip()
    return name or fallback


@dataclass(frozen=True)
class ImageSpec:
    """What one writer knows that becomes part of its images."""

    experiment: str
    image_name: str
    project: str
    dataset: str
    grid: Grid
    config: WriterConfig
    rgb: bool
    channel_names: tuple[str, ...]
    well: Well | None
    key_values: dict[str, str]
    omero_project_id: int | None = None
    omero_dataset_id: int | None = None
    """An existing OMERO container ImSwitch's OMERO settings name (ids of the server's)."""


def manifest(
    spec: ImageSpec,
    *,
    image_id: UUID,
    time_point: int,
    dtype: PixelType,
    tile_shape: tuple[int, int],
    acquired_at: datetime,
    extras: dict[str, str],
) -> OpenManifest:
    c = spec.config
    names, colors = channels(spec)
    key_values = {**extras, **spec.key_values}  # the writer's own facts win over a frame's
    key_values["time_point"] = str(time_point)
    key_values["time_points"] = str(c.n_time_points)
    height, width = tile_shape
    return OpenManifest(
        image_id=image_id,
        experiment=spec.experiment,
        project=spec.project,
        dataset=spec.dataset,
        image_name=spec.image_name,
        tile_width=width,
        tile_height=height,
        size_z=c.n_z_planes,
        size_c=len(names),
        size_t=1,
        dtype=dtype,
        positions=tuple(spec.grid.positions()),
        pixel_size=PixelSize(x_um=c.pixel_size_um, y_um=c.pixel_size_um, z_um=c.pixel_size_z_um),
        channels=names,
        channel_colors=colors,
        acquired_at=acquired_at,
        key_values=dict(list(key_values.items())[:MAX_KEY_VALUES]),
        time_interval_s=c.time_interval_s,
        first_time_point=time_point,
        well=spec.well,
        omero_project_id=spec.omero_project_id,
        omero_dataset_id=spec.omero_dataset_id,
    )


def channels(spec: ImageSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Channel names and colours of the image: RGB frames make three per ImSwitch channel."""
    c = spec.config
    colors = c.channel_colors or tuple(
        DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(c.n_channels)
    )
    if not spec.rgb:
        return tuple(safe_name(n, f"C{i}") for i, n in enumerate(spec.channel_names)), colors
    names = tuple(
        safe_name(f"{n} {s}" if c.n_channels > 1 else s) for n in spec.channel_names for s in RGB
    )
    return names, RGB_COLORS * c.n_channels


def well_of(metadata: dict[str, Any] | None) -> Well | None:
    """ImSwitch's `well_metadata` (wellRow, wellColumn, labwareLoadName, conditionLabel) as a
    Well, when it names a well; PermanentError if it names one that cannot be."""
    if not metadata:
        return None
    row, column = metadata.get("wellRow"), metadata.get("wellColumn")
    if row is None or column is None:
        return None
    if not _ROW.match(str(row)):
        raise PermanentError(f"well_metadata wellRow {row!r} is not a plate row (A, B, ..., AF)")
    try:
        number = int(column)
    except (TypeError, ValueError):
        raise PermanentError(f"well_metadata wellColumn {column!r} is not a number") from None
    condition = metadata.get("conditionLabel")
    return Well(
        plate=safe_name(str(metadata.get("labwareLoadName") or "plate")),
        row=str(row).upper(),
        column=number,
        condition=None if condition is None else str(condition)[:1024],
    )


def writer_key_values(
    base_dir: Path,
    area: str | None,
    shared_omero_key: str | None,
    well_metadata: dict[str, Any] | None,
) -> dict[str, str]:
    """What ImSwitch gives a writer, as the key-values of its images: its `base_dir`, the
    area name (`image_name`), `shared_omero_key`, every key of `well_metadata`."""
    out = {
        key_name(k): str(v)[:1024]
        for k, v in (well_metadata or {}).items()
        if v is not None and key_name(k)
    }
    if area:
        out["area"] = safe_name(area)
    if shared_omero_key:
        out["shared_omero_key"] = str(shared_omero_key)[:1024]
    out["base_dir"] = str(base_dir)[:1024]
    return out


def experiment_name(base_dir: Path) -> str:
    """ImSwitch puts an experiment's writers in `<data>/ExperimentController/<timestamp>/`."""
    return safe_name(base_dir.parent.name or "imswitch")

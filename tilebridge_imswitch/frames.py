"""One ImSwitch frame: its pixels as planes of the image, and what its metadata dict says.
Pure logic.

The metadata dict is `ExperimentController.save_frame_ome`'s (normal mode), a firmware
metadata list entry (performance mode) or the Lightsheet controller's; the names read are
`x`, `y`, `z` (stage µm), `time_index`, `z_index`, `channel_index`, `illuminationChannel`,
`tile_index`, `exposure_ms` (from ImSwitch's metadata hub) and `timestamp` if present.
Everything else (objective, detector, I2C sensors, illumination value, ...) is kept as
extra key-values, never refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import PixelType, PlaneMeta

READ = {
    "x", "y", "z", "time_index", "z_index", "channel_index", "illuminationChannel",
    "tile_index", "exposure_ms", "timestamp",
}  # fmt: skip
RGB = ("R", "G", "B")
RGB_COLORS = ("FF0000", "00FF00", "0000FF")
_KEY = re.compile(r"[^A-Za-z0-9 _.,()+=@-]")


@dataclass(frozen=True)
class FrameFacts:
    x_um: float
    y_um: float
    z_um: float | None
    time_index: int
    z_index: int | None
    channel_index: int | None
    channel: str | None
    tile_index: int | None
    exposure_ms: float | None
    timestamp: datetime | None
    extras: dict[str, str]
    """Every other key, as text (`Name`-safe keys, values cut at 1024 characters)."""


def facts(metadata: Mapping[str, Any]) -> FrameFacts:
    if not isinstance(metadata, Mapping):
        raise PermanentError(f"frame metadata must be a dict, not {type(metadata).__name__}")
    if "x" not in metadata or "y" not in metadata:
        raise PermanentError("frame metadata needs the stage position 'x' and 'y' (µm)")
    channel = metadata.get("illuminationChannel")
    return FrameFacts(
        x_um=_number(metadata, "x"),
        y_um=_number(metadata, "y"),
        z_um=_number(metadata, "z") if metadata.get("z") is not None else None,
        time_index=_index(metadata, "time_index") or 0,
        z_index=_index(metadata, "z_index"),
        channel_index=_index(metadata, "channel_index"),
        channel=None if channel is None else str(channel),
        tile_index=_index(metadata, "tile_index"),
        exposure_ms=_exposure(metadata),
        timestamp=_timestamp(metadata.get("timestamp")),
        extras={
            key_name(k): str(v)[:1024]
            for k, v in metadata.items()
            if k not in READ and v is not None and key_name(k)
        },
    )


def plane_meta(facts: FrameFacts, acquired_at: datetime) -> PlaneMeta:
    """What was measured when the frame was taken (its `timestamp` from the image's start)."""
    delta = None
    if facts.timestamp is not None:
        delta = (facts.timestamp - acquired_at).total_seconds()
    return PlaneMeta(
        x_um=facts.x_um,
        y_um=facts.y_um,
        z_um=facts.z_um,
        exposure_ms=facts.exposure_ms,
        delta_t_s=delta,
    )


def key_name(key: Any) -> str:
    """A metadata key as a valid key-value name (letters, digits and `_ .,()+=@-`)."""
    name = _KEY.sub("_", str(key)).strip(" ._,()+=@-")[:128]
    return name


def pixel_type(frame: np.ndarray[Any, Any]) -> PixelType:
    try:
        return PixelType(frame.dtype.newbyteorder("=").name)
    except ValueError:
        raise PermanentError(
            f"frames of dtype {frame.dtype} cannot be stored; use one of "
            f"{[t.value for t in PixelType]}"
        ) from None


def planes(frame: Any, rgb: bool) -> list[np.ndarray[Any, Any]]:
    """The 2-D planes of a frame: one for a mono camera, R, G, B for a colour one."""
    data = np.asarray(frame)
    if rgb:
        if data.ndim != 3 or data.shape[2] not in (3, 4):
            raise PermanentError(f"an RGB frame has shape (height, width, 3), not {data.shape}")
        return [data[:, :, s] for s in range(3)]  # an alpha sample is not kept
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim != 2:
        raise PermanentError(
            f"a mono frame has shape (height, width), not {data.shape} (isRGB is False)"
        )
    return [data]


def looks_rgb(frame: Any) -> bool:
    data = np.asarray(frame)
    return data.ndim == 3 and data.shape[2] in (3, 4)


def _number(metadata: Mapping[str, Any], key: str) -> float:
    try:
        value = float(metadata[key])
    except (TypeError, ValueError):
        raise PermanentError(
            f"frame metadata {key!r} must be a number, not {metadata[key]!r}"
        ) from None
    if not math.isfinite(value):
        raise PermanentError(f"frame metadata {key!r} must be finite, not {value}")
    return value


def _index(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise PermanentError(
            f"frame metadata {key!r} must be a whole number, not {value!r}"
        ) from None
    if index < 0 or (isinstance(value, float) and value != index):
        raise PermanentError(f"frame metadata {key!r} must be a whole number >= 0, not {value!r}")
    return index


def _exposure(metadata: Mapping[str, Any]) -> float | None:
    value = metadata.get("exposure_ms")
    try:
        exposure = None if value is None else float(value)
    except (TypeError, ValueError):
        return None  # a hub value of another kind: kept out of the planes, not refused
    return exposure if exposure is not None and math.isfinite(exposure) and exposure >= 0 else None


def _timestamp(value: Any) -> datetime | None:
    from datetime import UTC

    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and math.isfinite(value):
        return datetime.fromtimestamp(value, UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

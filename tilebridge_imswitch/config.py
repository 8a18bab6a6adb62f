"""ImSwitch's `OMEWriterConfig` and `OMEFileStorePaths`, and how the writer reads either ours or
ImSwitch's own objects (duck typed: ImSwitch is not a dependency).

The field names, defaults and methods are ImSwitch's, so code that builds them keeps working.
What the writer takes from a config is `WriterConfig`: validated once, the caller's object is
never changed (ImSwitch's writer turns its own flags off when something fails; this one
reports the failure instead).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilebridge_protocol.errors import PermanentError

log = logging.getLogger(__name__)

DEFAULT_COLORS = ("00FF00", "FF0000", "0000FF", "00FFFF", "FF00FF", "FFFF00")
"""The channel colours ImSwitch gives when none are configured (green, red, blue, ...)."""


@dataclass
class OMEWriterConfig:
    """What to write; ImSwitch's fields and defaults. `channel_names` and `channel_colors` stay
    None when not given (ImSwitch fills in `Channel_<i>`; here the frames' own
    `illuminationChannel` names the channels then)."""

    write_tiff: bool = False
    """One OME-TIFF hyperstack of the whole mosaic, `<base_dir>/<name>.ome.tif`."""
    write_zarr: bool = True
    """The OME-Zarr (NGFF 0.4) store ImSwitch's live view follows, `<base_dir>.ome.zarr`."""
    write_stitched_tiff: bool = False
    """A stitched, pyramidal OME-TIFF, `<base_dir>/stitched.ome.tif`."""
    write_tiff_single: bool = False
    """ImSwitch's one TIFF of appended tiles: not written (see docs/imswitch.md)."""
    write_individual_tiffs: bool = False
    """One OME-TIFF per frame under `<base_dir>/tiles/timepoint_<t>/`."""
    write_omero: bool = False
    """Ignored: the stream to the server is turned on by the adapter's settings."""
    omero_queue_size: int = 100
    min_period: float = 0.2
    compression: str = "zlib"
    zarr_compressor: Any = None
    pixel_size: float = 1.0
    pixel_size_z: float = 1.0
    dimension_separator: str = "/"
    n_time_points: int = 1
    n_z_planes: int = 1
    n_channels: int = 1
    channel_names: list[str] | None = None
    channel_colors: list[str] | None = None
    x_start: float = 0.0
    y_start: float = 0.0
    z_start: float = 0.0
    time_interval: float = 1.0


class OMEFileStorePaths:
    """Where one writer's files go; ImSwitch's layout: `base_dir/`, `base_dir/tiles/`,
    `base_dir.ome.zarr`. Folders are made when something is written into them."""

    def __init__(self, base_dir: str, shared_individual_tiffs_dir: str | None = None) -> None:
        del shared_individual_tiffs_dir  # ImSwitch ignores it too (deprecated there)
        self.base_dir = base_dir
        self.tiff_dir = os.path.join(base_dir, "tiles")
        self.zarr_dir = base_dir + ".ome.zarr"

    def ensure_tiff_dir(self) -> str:
        os.makedirs(self.tiff_dir, exist_ok=True)
        return self.tiff_dir

    def get_timepoint_dir(self, timepoint_index: int) -> str:
        folder = os.path.join(self.tiff_dir, f"timepoint_{timepoint_index:04d}")
        os.makedirs(folder, exist_ok=True)
        return folder


@dataclass(frozen=True)
class WriterConfig:
    """What the writer takes from an `OMEWriterConfig` (ours or ImSwitch's)."""

    write_zarr: bool
    write_tiff: bool
    write_stitched_tiff: bool
    write_individual_tiffs: bool
    write_tiff_single: bool
    write_omero: bool
    pixel_size_um: float
    pixel_size_z_um: float | None
    n_time_points: int
    n_z_planes: int
    n_channels: int
    channel_names: tuple[str, ...] | None
    """None: not configured (or ImSwitch's generated `Channel_<i>`)."""
    channel_colors: tuple[str, ...] | None
    time_interval_s: float | None

    @classmethod
    def of(cls, config: Any) -> WriterConfig:
        """Read any object with ImSwitch's attribute names; missing ones take the defaults."""
        defaults = OMEWriterConfig()

        def get(name: str) -> Any:
            return getattr(config, name, getattr(defaults, name))

        pixel = _positive(get("pixel_size"), "pixel_size")
        n_channels = _count(get("n_channels"), "n_channels", minimum=0) or 1
        names = _names(get("channel_names"), n_channels)
        colors = _colors(get("channel_colors"), n_channels)
        interval = float(get("time_interval") or 0) or None
        return cls(
            write_zarr=bool(get("write_zarr")),
            write_tiff=bool(get("write_tiff")),
            write_stitched_tiff=bool(get("write_stitched_tiff")),
            write_individual_tiffs=bool(get("write_individual_tiffs")),
            write_tiff_single=bool(get("write_tiff_single")),
            write_omero=bool(get("write_omero")),
            pixel_size_um=pixel,
            pixel_size_z_um=abs(float(get("pixel_size_z") or 0)) or None,
            n_time_points=_count(get("n_time_points"), "n_time_points"),
            n_z_planes=_count(get("n_z_planes"), "n_z_planes"),
            n_channels=n_channels,
            channel_names=names,
            channel_colors=colors,
            time_interval_s=interval if interval and interval > 0 else None,
        )

    def warnings(self, stream_to_server: bool) -> list[str]:
        """What this config asks for that is not done, said once per writer."""
        out = []
        if self.write_tiff_single:
            out.append(
                "write_tiff_single (one TIFF of appended tiles) is not written; use "
                "write_individual_tiffs or write_tiff"
            )
        if self.write_omero and not stream_to_server:
            out.append(
                "write_omero is set, but this adapter's stream_to_server is off: nothing goes "
                "to the server"
            )
        return out


def paths_of(file_paths: Any) -> tuple[Path, Path]:
    """(base_dir, zarr_dir) of an `OMEFileStorePaths` (ours or ImSwitch's) or a path."""
    if isinstance(file_paths, str | os.PathLike):
        base = Path(file_paths)
        return base, Path(f"{base}.ome.zarr")
    base_dir = getattr(file_paths, "base_dir", None)
    if base_dir is None:
        raise PermanentError(f"file_paths {file_paths!r} has no base_dir")
    zarr_dir = getattr(file_paths, "zarr_dir", None) or f"{base_dir}.ome.zarr"
    return Path(base_dir), Path(zarr_dir)


def _names(value: Any, n: int) -> tuple[str, ...] | None:
    if not value:
        return None
    names = tuple(str(v) for v in value)
    if names[:n] == tuple(f"Channel_{i}" for i in range(min(n, len(names)))):
        return None  # ImSwitch's placeholders: the frames will say what the channels are
    if len(names) < n:
        raise PermanentError(f"{len(names)} channel_names for n_channels={n}: {list(names)}")
    return names[:n]


def _colors(value: Any, n: int) -> tuple[str, ...] | None:
    if not value:
        return None
    colors = tuple(str(v).lstrip("#").upper() for v in value)
    bad = [c for c in colors if len(c) != 6 or any(ch not in "0123456789ABCDEF" for ch in c)]
    if bad:
        raise PermanentError(f"channel_colors must be RRGGBB hex, not {bad}")
    return tuple(colors[i % len(colors)] for i in range(n))


def _positive(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PermanentError(f"{name} must be a number, not {value!r}") from None
    if not number > 0:
        raise PermanentError(f"{name} must be > 0, not {value!r}")
    return number


def _count(value: Any, name: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PermanentError(f"{name} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise PermanentError(f"{name} must be >= {minimum}, not {value!r}")
    return number

"""Drive `tilebridge_imswitch.OMEWriter` the way ImSwitch's experiment modes drive their writer.

Read from openUC2/ImSwitch at COMMIT (2026-08-21); every function names the lines it mirrors.
ImSwitch is not imported: its call sequence is re-enacted here, and its own config and paths
objects are stood in for by lookalikes with ImSwitch's attribute names and defaults, so the
adapter is shown to take ImSwitch's objects, not only its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilebridge_imswitch import OMEWriter

COMMIT = "6ea992b33db76533c43c9000a946c9f159f196a6"
NORMAL = "imswitch/imcontrol/controller/controllers/experiment_controller/experiment_normal_mode.py"
PERFORMANCE = (
    "imswitch/imcontrol/controller/controllers/experiment_controller/experiment_performance_mode.py"
)
CONTROLLER = "imswitch/imcontrol/controller/controllers/ExperimentController.py"
HUB_EXTRAS = {
    # save_frame_ome merges these from ImSwitch's metadata hub (ExperimentController.py:1930-1957)
    "objective_name": "10x Plan",
    "objective_magnification": 10,
    "detector_is_rgb": False,
    "pixel_size_um": 0.5,
    "i2c_temperature_c": 21.5,
}


@dataclass
class ImSwitchConfig:
    """Stands in for ImSwitch's own `OMEWriterConfig` (ome_writer.py:46-118): the same fields,
    and its `__post_init__`, which names channels `Channel_<i>` and picks colours when none
    are given."""

    write_tiff: bool = False
    write_zarr: bool = True
    write_stitched_tiff: bool = False
    write_tiff_single: bool = False
    write_individual_tiffs: bool = False
    write_omero: bool = False
    omero_queue_size: int = 100
    min_period: float = 0.2
    compression: str = "zlib"
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

    def __post_init__(self) -> None:
        if self.channel_names is None:
            self.channel_names = [f"Channel_{i}" for i in range(self.n_channels)]
        if self.channel_colors is None:
            cycle = ["00FF00", "FF0000", "0000FF", "00FFFF", "FF00FF", "FFFF00"]
            self.channel_colors = [cycle[i % len(cycle)] for i in range(self.n_channels)]


class ImSwitchPaths:
    """Stands in for ImSwitch's `OMEFileStorePaths` (ome_writer.py:139-172)."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self.tiff_dir = os.path.join(base_dir, "tiles")
        self.zarr_dir = base_dir + ".ome.zarr"


@dataclass(frozen=True)
class Point:
    """One scan point of an area, in acquisition order (ImSwitch's `snake_tiles[i][j]`)."""

    x: float
    y: float
    ix: int
    iy: int


def area(
    x0: float, y0: float, nx: int, ny: int, step: tuple[float, float], *,
    snake: bool = True, keep: Callable[[int, int], bool] = lambda ix, iy: True,
) -> list[Point]:  # fmt: skip
    """An area's points as ImSwitch's frontend orders them: rows top to bottom, odd rows right
    to left when `snake`; `keep` leaves holes (a round area)."""
    points = []
    for iy in range(ny):
        columns = range(nx - 1, -1, -1) if snake and iy % 2 else range(nx)
        for ix in columns:
            if keep(ix, iy):
                points.append(Point(x0 + ix * step[0], y0 + iy * step[1], ix, iy))
    return points


def grid_of(points: list[Point]) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """`calculate_grid_parameters` (experiment_mode_base.py:215-248): start = the smallest x and
    y, step = the first gap between distinct values (100 with one value), shape = how many
    distinct values."""
    xs, ys = sorted({p.x for p in points}), sorted({p.y for p in points})
    x_step = xs[1] - xs[0] if len(xs) > 1 else 100.0
    y_step = ys[1] - ys[0] if len(ys) > 1 else 100.0
    return (len(xs), len(ys)), (xs[0], ys[0], x_step, y_step)


@dataclass
class Camera:
    """Distinct frames, remembered by what they show, so every output can be checked."""

    height: int
    width: int
    dtype: Any = np.uint16
    rgb: bool = False
    seed: int = 0
    taken: dict[tuple[Any, ...], np.ndarray[Any, Any]] = field(default_factory=dict)

    def snap(self, *what: Any) -> np.ndarray[Any, Any]:
        rng = np.random.default_rng(abs(hash((self.seed, *what))) % 2**32)
        shape = (self.height, self.width, 3) if self.rgb else (self.height, self.width)
        high = 250 if np.dtype(self.dtype).itemsize == 1 else 60000
        frame = rng.integers(1, high, shape).astype(self.dtype)  # never 0: holes are 0
        self.taken[what] = frame
        return frame


@dataclass
class Run:
    """What a driven experiment made: writers by (time point, area), what they returned."""

    writers: dict[tuple[int, int], OMEWriter]
    chunk_infos: list[dict[str, Any]]
    stores_seen: list[str | None]
    refused: list[str] = field(default_factory=list)


def normal_mode(
    data: Path,
    areas: list[list[Point]],
    camera: Camera,
    *,
    n_times: int = 1,
    z_offsets: tuple[float, ...] = (0.0,),
    sources: tuple[str, ...] = ("LED",),
    pixel_size: float = 1.0,
    flags: dict[str, bool] | None = None,
    well: dict[str, Any] | None = None,
    area_names: tuple[str, ...] = (),
    base_z: float = 100.0,
    exp_name: str = "scan",
    time_interval: float = 1.0,
    frame_extras: Callable[[int], dict[str, Any]] = lambda step: {},
) -> Run:
    """A normal-mode experiment, as ImSwitch runs it:

    * every writer is made before the first frame: for each time point
      (ExperimentController.py:1160-1177) one per area (experiment_normal_mode.py:383-571),
      named `<file><area>_<t>_<exp>_<area>_<areaName>` (:417-432), with the area's grid
      (:440-441), `n_time_points` = every time point (:491-501), the active sources as channel
      names (:447-489) and the area's well (:506-528);
    * frames per point, per z plane, per source (:640-1000), with `save_frame_ome`'s metadata
      (ExperimentController.py:1916-1957) and `store` read after each (:2007-2020);
    * each area's writer finalized after its frames (experiment_normal_mode.py:1060-1075),
      and at the last time point every writer again (:1108-1118, ExperimentController.py
      :3016-3043).

    `frame_extras(step)` adds keys to a frame's metadata (what a metadata hub may add, e.g. a
    `timestamp`, which `save_frame_ome` itself does not send).
    """
    dir_path = data / "ExperimentController" / "20261201_101500"
    dir_path.mkdir(parents=True, exist_ok=True)
    m_file_name = f"20261201_101500_{exp_name}"
    writers: dict[tuple[int, int], OMEWriter] = {}
    for t in range(n_times):
        for index, points in enumerate(areas):
            name = area_names[index] if index < len(area_names) else ""
            base = dir_path / f"{m_file_name}{index}_{t}_{exp_name}_{index}_{name}"
            grid_shape, grid_geometry = grid_of(points)
            config = ImSwitchConfig(
                **(flags or {}),
                write_tiff_single=False,
                min_period=0.1,
                pixel_size=pixel_size,
                n_time_points=n_times,
                n_z_planes=len(z_offsets),
                n_channels=len(sources),
                channel_names=list(sources),
                time_interval=time_interval,
            )
            writers[t, index] = OMEWriter(
                file_paths=ImSwitchPaths(str(base)),
                tile_shape=(camera.width, camera.height),  # ImSwitch passes _shape[-1], [-2]
                grid_shape=grid_shape,
                grid_geometry=grid_geometry,
                config=config,
                logger=None,
                isRGB=camera.rgb,
                omero_connection_params=None,
                shared_omero_key=None,
                well_metadata=well,
                image_name=name or None,
            )
    run = Run(writers, [], [])
    step = 0
    for t in range(n_times):
        for index, points in enumerate(areas):
            writer = writers[t, index]
            for tile_index, point in enumerate(points):
                for z_index, offset in enumerate(z_offsets):
                    for channel_index, source in enumerate(sources):
                        step += 1
                        frame = camera.snap(t, index, point.ix, point.iy, z_index, channel_index)
                        metadata = {
                            "x": point.x,
                            "y": point.y,
                            "z": base_z + offset,
                            "runningNumber": step,
                            "illuminationChannel": source,
                            "illuminationValue": 512,
                            "tile_index": tile_index,
                            "time_index": t,
                            "z_index": z_index,
                            "channel_index": channel_index,
                            **HUB_EXTRAS,
                            "exposure_ms": 20.0 + channel_index,
                            **frame_extras(step),
                        }
                        record(run, writer, frame, metadata)
            writer.finalize()
        if t == n_times - 1:
            for writer in writers.values():
                writer.finalize()
    return run


def performance_mode(
    data: Path,
    camera: Camera,
    *,
    nx: int,
    ny: int,
    nz: int = 1,
    start: tuple[float, float, float] = (0.0, 0.0, 50.0),
    step: tuple[float, float, float] = (100.0, 100.0, 2.0),
    illumination: dict[str, int] | None = None,
    pixel_size: float = 1.0,
    flags: dict[str, bool] | None = None,
    n_times: int = 1,
    stop_after: int | None = None,
) -> Run:
    """A performance-mode (hardware-triggered) scan, as ImSwitch runs it: per time point a
    writer named by the second it starts in (experiment_performance_mode.py:596-611), made in
    `_writer_loop_ome` with `n_channels` = the active illuminations and no channel names
    (ExperimentController.py:2876-2935), frames in the firmware's order with only x, y, z,
    illuminationChannel, illuminationValue and runningNumber (experiment_performance_mode.py
    :646-698, snake rows), written as they come off the camera (ExperimentController.py
    :2944-2970) and finalized once (:2976), also when the user stopped the scan after
    `stop_after` frames (the loop ends on `_stop_writer_evt`, :2940)."""
    active = {k: v for k, v in (illumination or {"LED": 255}).items() if v > 0}
    metadata_list = []
    running = 0
    x0, y0, z0 = start
    for iy in range(ny):
        for ix in range(nx):
            for iz in range(nz):
                column = nx - 1 - ix if iy % 2 == 1 else ix
                for channel, value in active.items():
                    running += 1
                    metadata_list.append(
                        {
                            "x": x0 + column * step[0],
                            "y": y0 + iy * step[1],
                            "z": z0 + iz * step[2],
                            "illuminationChannel": channel,
                            "illuminationValue": value,
                            "runningNumber": running,
                        }
                    )
    run = Run({}, [], [])
    for t in range(n_times):
        base = data / "ExperimentController" / "20261201_101500_FastStageScan"
        base.parent.mkdir(parents=True, exist_ok=True)
        config = ImSwitchConfig(
            **(flags or {}),
            min_period=0,
            pixel_size=pixel_size,
            n_time_points=n_times,
            n_z_planes=nz,
            n_channels=len(active),
        )
        writer = OMEWriter(
            file_paths=ImSwitchPaths(str(base)),  # the same second: the same name each time
            tile_shape=(camera.width, camera.height),
            grid_shape=(nx, ny),
            grid_geometry=(x0, y0, step[0], step[1]),
            config=config,
            logger=None,
            isRGB=camera.rgb,
        )
        run.writers[t, 0] = writer
        for meta in metadata_list[:stop_after]:
            ix = round((meta["x"] - x0) / step[0])
            iy = round((meta["y"] - y0) / step[1])
            iz = round((meta["z"] - z0) / step[2])
            c = list(active).index(meta["illuminationChannel"])
            record(run, writer, camera.snap(t, 0, ix, iy, iz, c), meta)
        writer.finalize()
    return run


def record(run: Run, writer: OMEWriter, frame: Any, metadata: dict[str, Any]) -> None:
    """One frame through ImSwitch's frame saver: a refusal is logged by its `_on_error` and the
    experiment goes on (frame_save_worker.py:100-120, ExperimentController.py:2022-2025)."""
    try:
        info = writer.write_frame(frame.copy(), metadata)
    except Exception as exc:
        run.refused.append(str(exc))
        return
    run.chunk_infos.append(info)
    run.stores_seen.append(writer.store)


def frames_by_cell(camera: Camera, t: int, area_index: int) -> Iterator[tuple[Any, ...]]:
    for key, frame in camera.taken.items():
        if key[0] == t and key[1] == area_index:
            yield (*key[2:], frame)

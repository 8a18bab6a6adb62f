"""Which tile of the image an ImSwitch frame is. Pure logic: no I/O, no threads.

Position: from the frame's stage x/y and the writer's grid geometry, never from `tile_index`
(ImSwitch numbers frames in acquisition order, and its scans are often snake-shaped, so a
tile_index is not a grid cell). The image's positions are the grid's cells in raster order
(`index = iy * nx + ix`, top-left corner at `x_start + ix * x_step`); a frame belongs to the
cell its x/y is nearest, if it is within a quarter step of it on both axes. Anything farther
is refused with the reason: a frame is never placed where it was not taken.

Channel: `channel_index` when the frame gives it (normal mode), checked against the
configured names when there are any; else the configured name its `illuminationChannel`
matches; else (performance mode, no names configured) the order in which the frames'
illumination names first appear, which is the order ImSwitch acquires them in.

Z plane: `z_index` when given; else (performance mode) the rank of the frame's stage z among
the distinct z values seen at its position and channel, as ImSwitch moves z upwards there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import StagePosition

TOLERANCE = 0.25
"""Of a step: how far a frame may be from its cell's planned position."""
Z_TOLERANCE_UM = 0.05


@dataclass(frozen=True)
class Grid:
    """ImSwitch's `grid_shape` (nx, ny) and `grid_geometry` (x_start, y_start, x_step,
    y_step), in µm. A step that is not positive (one column, or ImSwitch's placeholder
    `(0, 0, 0, 0)`) is taken as the tile's width (height) on the sample."""

    nx: int
    ny: int
    x_start: float
    y_start: float
    x_step: float
    y_step: float

    @classmethod
    def of(
        cls,
        grid_shape: tuple[int, int],
        grid_geometry: tuple[float, float, float, float],
        tile_extent_um: tuple[float, float],
    ) -> Grid:
        try:
            nx, ny = (int(n) for n in grid_shape)
            x_start, y_start, x_step, y_step = (float(v) for v in grid_geometry)
        except (TypeError, ValueError):
            raise PermanentError(
                f"grid_shape {grid_shape!r} must be (nx, ny) and grid_geometry "
                f"{grid_geometry!r} (x_start, y_start, x_step, y_step)"
            ) from None
        if nx < 1 or ny < 1:
            raise PermanentError(f"grid_shape {grid_shape!r} must be at least (1, 1)")
        if not all(map(math.isfinite, (x_start, y_start, x_step, y_step))):
            raise PermanentError(f"grid_geometry {grid_geometry!r} must be finite")
        width, height = tile_extent_um
        return cls(
            nx, ny, x_start, y_start,
            x_step if x_step > 0 else width,
            y_step if y_step > 0 else height,
        )  # fmt: skip

    @property
    def count(self) -> int:
        return self.nx * self.ny

    def positions(self, z_um: float = 0.0) -> list[StagePosition]:
        return [
            StagePosition(
                index=iy * self.nx + ix,
                x_um=self.x_start + ix * self.x_step,
                y_um=self.y_start + iy * self.y_step,
                z_um=z_um,
            )
            for iy in range(self.ny)
            for ix in range(self.nx)
        ]

    def cell(self, index: int) -> tuple[int, int]:
        """(ix, iy) of position `index`."""
        return index % self.nx, index // self.nx

    def locate(self, x: float, y: float) -> int:
        """The position a frame taken at stage (x, y) µm is; PermanentError if none."""
        fx = (x - self.x_start) / self.x_step
        fy = (y - self.y_start) / self.y_step
        ix, iy = round(fx), round(fy)
        off_x, off_y = abs(fx - ix), abs(fy - iy)
        inside = 0 <= ix < self.nx and 0 <= iy < self.ny
        if inside and off_x <= TOLERANCE and off_y <= TOLERANCE:
            return iy * self.nx + ix
        near_x = min(max(ix, 0), self.nx - 1)
        near_y = min(max(iy, 0), self.ny - 1)
        planned = (self.x_start + near_x * self.x_step, self.y_start + near_y * self.y_step)
        raise PermanentError(
            f"stage position ({x:g}, {y:g}) µm matches no planned position of this writer's "
            f"{self.nx} x {self.ny} grid (x {self.x_start:g} + i * {self.x_step:g}, "
            f"y {self.y_start:g} + j * {self.y_step:g}); the nearest, ({planned[0]:g}, "
            f"{planned[1]:g}) µm, is {math.hypot(x - planned[0], y - planned[1]):.1f} µm away"
        )


@dataclass
class Channels:
    """The channel of each frame (see the module docstring); `names` once all are known."""

    count: int
    configured: tuple[str, ...] | None
    learned: dict[int, str] = field(default_factory=dict)
    """Channel index -> the illumination name its frames carry (no names configured)."""

    @property
    def names(self) -> tuple[str, ...] | None:
        if self.configured is not None:
            return self.configured
        if len(self.learned) < self.count:
            return None
        return tuple(self.learned[i] for i in range(self.count))

    def settle(self) -> tuple[str, ...]:
        """The names, a channel never named by its frames called `C<i>`."""
        for i in range(self.count):
            self.learned.setdefault(i, f"C{i}")
        names = self.names
        assert names is not None
        return names

    def index(self, given: int | None, name: str | None) -> int:
        if given is not None:
            if not 0 <= given < self.count:
                raise PermanentError(
                    f"channel_index {given} is outside the writer's {self.count} channels"
                )
            if self.configured is None:
                self.learned.setdefault(given, name if name is not None else f"C{given}")
            return given
        if name is None:
            if self.count == 1:
                self.learned.setdefault(0, "C0")
                return 0
            raise PermanentError(
                f"a frame of a {self.count}-channel writer needs channel_index or "
                "illuminationChannel"
            )
        if self.configured is not None:
            if name in self.configured:
                return self.configured.index(name)
            if self.count == 1:
                return 0
            raise PermanentError(
                f"illuminationChannel {name!r} is none of the channels {list(self.configured)}"
            )
        for index, known in self.learned.items():
            if known == name:
                return index
        if len(self.learned) >= self.count:
            raise PermanentError(
                f"illuminationChannel {name!r} would be channel {len(self.learned) + 1} of a "
                f"writer configured for {self.count}: {list(self.learned.values())}"
            )
        index = min(set(range(self.count)) - set(self.learned))
        self.learned[index] = name
        return index


@dataclass
class ZPlanes:
    """z index of frames that do not give one (see the module docstring)."""

    count: int
    heights: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    def index(self, given: int | None, z_um: float | None, position: int, channel: int) -> int:
        if given is not None:
            z = given
        elif self.count == 1:
            z = 0
        elif z_um is None:
            raise PermanentError(
                f"a frame of a {self.count}-plane z stack needs z_index or its stage z"
            )
        else:
            seen = self.heights.setdefault((position, channel), [])
            matches = [i for i, h in enumerate(seen) if abs(h - z_um) <= Z_TOLERANCE_UM]
            if matches:
                z = matches[0]
            else:
                seen.append(z_um)
                z = len(seen) - 1
        if not 0 <= z < self.count:
            raise PermanentError(
                f"z plane {z} is outside the writer's {self.count} planes (n_z_planes)"
            )
        return z

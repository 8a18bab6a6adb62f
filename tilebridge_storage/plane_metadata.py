"""What every file and OMERO backend says about each plane and about the image, from the
manifest and the measured `PlaneMeta` of its tiles. Pure logic, shared by the backends.

Per-position outputs (archive series, per-position OME-TIFF, per_tile OMERO images) have one
plane per tile: its Position X/Y/Z is where the stage was measured (the planned position
where nothing was measured), with the tile's exposure and DeltaT. The planned position stays
in the StageLabel / key-values beside it.

Mosaic outputs (stitched TIFF, OME-Zarr, OMERO mosaics, the hyperstack) have one plane per
(t, c, z) made of many tiles: Position X/Y is the canvas origin (where the mosaic is placed),
Position Z the mean measured z of the plane's tiles, ExposureTime their exposure when they
agree, DeltaT the earliest of them (when the plane's acquisition began). What was measured
per tile is kept in `measured_key_values`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from statistics import fmean

from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta

MEASURED_NS = "tilebridge.org/measured"
"""Namespace of the per-tile measured metadata (a MapAnnotation next to the image's own)."""
MAX_MEASURED_ENTRIES = 20_000
"""Per-tile entries kept in `measured_key_values`; beyond that only the planes say it."""


@dataclass(frozen=True)
class PlaneValues:
    """One OME Plane: where, how long and when."""

    the_t: int
    the_c: int
    the_z: int
    position_x_um: float
    position_y_um: float
    position_z_um: float
    exposure_ms: float | None = None
    delta_t_s: float | None = None


def plane_order(m: OpenManifest) -> list[tuple[int, int, int]]:
    """(t, c, z) of every plane in XYZCT order (z fastest), the order of TCZYX pages."""
    return [(t, c, z) for t in range(m.size_t) for c in range(m.size_c) for z in range(m.size_z)]


def position_planes(
    m: OpenManifest, planes: Mapping[TileKey, PlaneMeta], index: int
) -> list[PlaneValues]:
    """The planes of position `index`, measured values where there are any."""
    planned = m.positions[index]
    out = []
    for t, c, z in plane_order(m):
        meta = planes.get(TileKey(index, z, c, t)) or PlaneMeta()
        out.append(
            PlaneValues(
                t, c, z,
                _first(meta.x_um, planned.x_um),
                _first(meta.y_um, planned.y_um),
                _first(meta.z_um, planned.z_um),
                meta.exposure_ms,
                meta.delta_t_s,
            )
        )  # fmt: skip
    return out


def mosaic_planes(
    m: OpenManifest,
    planes: Mapping[TileKey, PlaneMeta],
    origin_x_um: float,
    origin_y_um: float,
    holds: Callable[[TileKey], bool] = lambda key: True,
) -> list[PlaneValues]:
    """The planes of a mosaic placed at (origin_x_um, origin_y_um), from the tiles the image
    `holds` (a tile never taken says nothing about where the stage was)."""
    out = []
    for t, c, z in plane_order(m):
        held = [p for p in m.positions if holds(TileKey(p.index, z, c, t))] or list(m.positions)
        metas = [planes.get(TileKey(p.index, z, c, t)) or PlaneMeta() for p in held]
        heights = [_first(meta.z_um, p.z_um) for meta, p in zip(metas, held, strict=True)]
        exposures = {meta.exposure_ms for meta in metas if meta.exposure_ms is not None}
        times = [meta.delta_t_s for meta in metas if meta.delta_t_s is not None]
        out.append(
            PlaneValues(
                t, c, z, origin_x_um, origin_y_um, fmean(heights),
                exposures.pop() if len(exposures) == 1 else None,
                min(times) if times else None,
            )
        )  # fmt: skip
    return out


def measured_key_values(m: OpenManifest, planes: Mapping[TileKey, PlaneMeta]) -> dict[str, str]:
    """One entry per measured tile, `tile <index> z<z> c<c> t<t>`, planned position beside."""
    out: dict[str, str] = {}
    for key in sorted(planes):
        if len(out) >= MAX_MEASURED_ENTRIES:
            out["more"] = f"{len(planes) - len(out)} more tiles: see the planes"
            break
        meta, planned = planes[key], m.positions[key.index]
        parts = []
        if meta.x_um is not None or meta.y_um is not None or meta.z_um is not None:
            xyz = (_show(meta.x_um), _show(meta.y_um), _show(meta.z_um))
            parts.append("stage {} {} {} um".format(*xyz))
        if meta.exposure_ms is not None:
            parts.append(f"exposure {meta.exposure_ms:g} ms")
        if meta.delta_t_s is not None:
            parts.append(f"dt {meta.delta_t_s:g} s")
        parts.append(f"planned {planned.x_um:g} {planned.y_um:g} {planned.z_um:g} um")
        out[f"tile {key.index} z{key.z} c{key.c} t{key.t}"] = "; ".join(parts)
    return out


def image_key_values(m: OpenManifest) -> dict[str, str]:
    """The manifest's key-values and what the optional open fields say, as text."""
    out = dict(m.key_values)
    if m.time_interval_s is not None:
        out.setdefault("time_interval_s", f"{m.time_interval_s:g}")
    if m.first_time_point or m.time_interval_s is not None:
        out.setdefault("first_time_point", str(m.first_time_point))
    if m.well is not None:
        out.setdefault("plate", m.well.plate)
        out.setdefault("well", m.well.name)
        if m.well.condition:
            out.setdefault("condition", m.well.condition)
    return out


def missing_planes(
    m: OpenManifest, index: int, present: Collection[TileKey], limit: int = 1024
) -> dict[str, str]:
    """`tilebridge.missing_planes` of a position some of whose planes are not `present`
    (stored as zeros), e.g. `t0 c1 z0, t0 c1 z1`; nothing when every plane is there."""
    gone = [
        f"t{t} c{c} z{z}" for t, c, z in plane_order(m) if TileKey(index, z, c, t) not in present
    ]
    if not gone:
        return {}
    text = ", ".join(gone)
    if len(text) > limit:
        text = text[: limit - 4].rsplit(", ", 1)[0] + ", ..."
    return {"tilebridge.missing_planes": text}


def ome_color(hex_rgb: str) -> int:
    """OME-XML's Color: RGBA packed in a signed 32-bit integer."""
    value = (int(hex_rgb, 16) << 8) | 0xFF
    return value - 2**32 if value >= 2**31 else value


def _first(measured: float | None, planned: float) -> float:
    return planned if measured is None else measured


def _show(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"

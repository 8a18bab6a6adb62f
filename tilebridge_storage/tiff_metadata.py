"""The OME metadata tifffile writes for an image: pixel sizes, channels (names, colours), time
increment, every plane's position, exposure and DeltaT, and key-values as MapAnnotations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.plane_metadata import MEASURED_NS, PlaneValues, ome_color

METADATA_NS = "tilebridge.org/metadata"
"""Namespace of the image's own key-values (the same as in OMERO)."""


def ome_metadata(
    m: OpenManifest,
    name: str,
    planes: Sequence[PlaneValues],
    key_values: Mapping[str, str] | None = None,
    measured: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """tifffile's `metadata=` for one TCZYX series with these planes (in XYZCT order)."""
    plane = [_plane(p) for p in planes]
    channel: dict[str, list[Any]] = {"Name": [m.channel_name(c) for c in range(m.size_c)]}
    if m.channel_colors:
        channel["Color"] = [ome_color(color) for color in m.channel_colors]
    meta: dict[str, Any] = {
        "axes": "TCZYX",
        "Name": name,
        "AcquisitionDate": m.acquired_at.isoformat(),
        "PhysicalSizeX": m.pixel_size.x_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": m.pixel_size.y_um,
        "PhysicalSizeYUnit": "µm",
        "Channel": channel,
        "Plane": plane,
    }
    if m.pixel_size.z_um is not None:
        meta["PhysicalSizeZ"] = m.pixel_size.z_um
        meta["PhysicalSizeZUnit"] = "µm"
    if m.time_interval_s is not None:
        meta["TimeIncrement"] = m.time_interval_s
        meta["TimeIncrementUnit"] = "s"
    maps = []
    if key_values:
        maps.append({"Namespace": METADATA_NS, "Value": dict(key_values)})
    if measured:
        maps.append({"Namespace": MEASURED_NS, "Value": dict(measured)})
    if maps:
        meta["MapAnnotation"] = maps
    return meta


def _plane(p: PlaneValues) -> dict[str, Any]:
    # One dict per plane, so a plane without a measurement simply lacks the attribute.
    out: dict[str, Any] = {
        "PositionX": p.position_x_um,
        "PositionXUnit": "µm",
        "PositionY": p.position_y_um,
        "PositionYUnit": "µm",
        "PositionZ": p.position_z_um,
        "PositionZUnit": "µm",
    }
    if p.exposure_ms is not None:
        out |= {"ExposureTime": p.exposure_ms, "ExposureTimeUnit": "ms"}
    if p.delta_t_s is not None:
        out |= {"DeltaT": p.delta_t_s, "DeltaTUnit": "s"}
    return out

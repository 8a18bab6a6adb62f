"""The OME metadata tifffile writes for an image: pixel sizes, channels, stage position."""

from __future__ import annotations

from typing import Any

from tilebridge_protocol.messages import OpenManifest


def ome_metadata(
    m: OpenManifest, name: str, x_um: float, y_um: float, z_um: float | None = None
) -> dict[str, Any]:
    """tifffile's `metadata=` for one TCZYX series whose planes all sit at (x, y[, z]) µm."""
    planes = m.size_t * m.size_c * m.size_z
    position: dict[str, list[Any]] = {
        "PositionX": [x_um] * planes,
        "PositionXUnit": ["µm"] * planes,
        "PositionY": [y_um] * planes,
        "PositionYUnit": ["µm"] * planes,
    }
    if z_um is not None:
        position |= {"PositionZ": [z_um] * planes, "PositionZUnit": ["µm"] * planes}
    meta: dict[str, Any] = {
        "axes": "TCZYX",
        "Name": name,
        "AcquisitionDate": m.acquired_at.isoformat(),
        "PhysicalSizeX": m.pixel_size.x_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": m.pixel_size.y_um,
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": [m.channel_name(c) for c in range(m.size_c)]},
        "Plane": position,
    }
    if m.pixel_size.z_um is not None:
        meta["PhysicalSizeZ"] = m.pixel_size.z_um
        meta["PhysicalSizeZUnit"] = "µm"
    return meta

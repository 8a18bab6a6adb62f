"""The agent's acquisition defaults (ImSwitch's OMEWriterConfig flags): which targets an
experiment gets when its spec names none, and how the agent sends.

A convenience over the spec's own `targets` / `server`: `targets_for(spec)` maps the flags
onto local targets under `output_dir`. Kept in the spool (`omewriter.json`) across
restarts; `POST /config` changes it for the next experiment (transport at once)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.confine import open_confined
from edge_agent.models import SERVER, LocalTarget
from tilebridge_protocol.framing import Codec
from tilebridge_protocol.messages import Layout, Name
from tilebridge_runtime.durable import atomic_write
from tilebridge_storage import registry

log = logging.getLogger(__name__)

MiB = 1024 * 1024
LOCAL_BACKENDS: dict[str, str] = {
    # backend kind (tilebridge_storage.registry): the config flag that turns it on
    "ome_tiff": "write_tiff",
    "ome_zarr": "write_zarr",
    "stitched_tiff": "write_stitched_tiff",
}


class Compression(StrEnum):
    NONE = "none"
    ZSTD = "zstd"


class OMEWriterConfig(BaseModel):
    """What to write and how to send it; mirrors ImSwitch's OMEWriterConfig flags."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    write_tiff: bool = True
    """One OME-TIFF per stage position (tiles as acquired)."""
    write_zarr: bool = False
    """An OME-Zarr mosaic with a multiscale pyramid."""
    write_stitched_tiff: bool = False
    """A stitched, pyramidal TIFF of the mosaic."""
    write_omero: bool = True
    """Stream to the server through the durable disk buffer; the server writes OMERO."""
    max_bytes_in_flight: int = Field(default=256 * MiB, ge=MiB, le=1024 * 1024 * MiB)
    """Bytes of frames queued for, but not yet written by, the local backends."""
    omero_project: Name = "imswitch"
    omero_dataset: Name = "scans"
    layout: Layout = Layout.MOSAIC
    compression: Compression = Compression.NONE
    """Chunks on the wire: zstd costs CPU on the Pi and saves link bandwidth."""
    bandwidth_limit_mbps: float | None = Field(default=None, gt=0, le=100_000)
    """Cap on the upload rate (after compression); None: no cap."""
    output_dir: Path = Path("/var/lib/tilebridge-edge/output")
    """Local backends write under `<output_dir>/<backend>/`."""

    @field_validator("output_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("output_dir must be an absolute path")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OMEWriterConfig:
        if not self.targets:
            raise ValueError(
                "write_tiff, write_zarr, write_stitched_tiff, write_omero are all false: "
                "enable at least one"
            )
        mosaics = [
            flag
            for kind, flag in LOCAL_BACKENDS.items()
            if registry.KINDS[kind].mosaic_only and getattr(self, flag)
        ]
        if self.layout is Layout.PER_TILE and mosaics:
            raise ValueError(
                f"layout per_tile keeps positions apart, but {' and '.join(mosaics)} "
                "stitch a mosaic: turn them off or use layout mosaic"
            )
        return self

    @property
    def targets(self) -> list[str]:
        local = [name for name, flag in LOCAL_BACKENDS.items() if getattr(self, flag)]
        return [*local, SERVER] if self.write_omero else local

    @property
    def codec(self) -> Codec:
        return Codec.ZSTD if self.compression is Compression.ZSTD else Codec.RAW

    @property
    def bandwidth_limit_bytes_per_s(self) -> int | None:
        mbps = self.bandwidth_limit_mbps
        return None if mbps is None else max(1, round(mbps * 1_000_000 / 8))

    def local_targets(self) -> list[LocalTarget]:
        """The flags as local targets, each under `<output_dir>/<kind>`."""
        return [
            LocalTarget(kind=kind, folder=registry.folder_for(self.output_dir, kind))
            for kind, flag in LOCAL_BACKENDS.items()
            if getattr(self, flag)
        ]

    @classmethod
    def for_transport(cls, codec: Codec, limit: int | None, **values: Any) -> OMEWriterConfig:
        """Defaults that keep the agent's own transport settings."""
        base: dict[str, Any] = {
            "compression": "zstd" if codec is Codec.ZSTD else "none",
            "bandwidth_limit_mbps": None if limit is None else limit * 8 / 1_000_000,
        }
        return cls(**(base | values))


DEFAULT_OUTPUT_DIR: Path = OMEWriterConfig.model_fields["output_dir"].default


class ConfigStore:
    """The current defaults, kept in the spool across restarts (`omewriter.json`).

    An update is validated whole, its output_dir checked against `local_output_root`, and
    written to disk before it replaces the current one: a refused or unsaveable update (a
    full spool disk: TransientError) changes nothing."""

    def __init__(
        self,
        path: Path | None,
        local_output_root: Path,
        initial: OMEWriterConfig,
        on_change: Callable[[OMEWriterConfig], None] | None = None,
    ) -> None:
        self.path = path
        self.local_output_root = local_output_root
        self._on_change = on_change
        self._current = self._load() or initial

    def current(self) -> OMEWriterConfig:
        return self._current

    def update(self, changes: dict[str, Any]) -> OMEWriterConfig:
        config = OMEWriterConfig.model_validate(self._current.model_dump() | changes)
        if config.output_dir != DEFAULT_OUTPUT_DIR:
            open_confined(self.local_output_root, config.output_dir).close()
        if self.path is not None:
            text = config.model_dump_json(indent=2).encode()
            atomic_write(self.path, partial(_write, data=text))
        self._current = config
        if self._on_change is not None:
            self._on_change(config)
        return config

    def _load(self) -> OMEWriterConfig | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            return OMEWriterConfig.model_validate_json(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring the saved acquisition config %s: %s", self.path, exc)
            return None


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)

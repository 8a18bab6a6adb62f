"""What the OMEWriter writes and how it sends it, and how a config is applied to the agent."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.agent import EdgeAgent
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.framing import Codec
from tilebridge_protocol.messages import Layout, Name
from tilebridge_storage import registry

MiB = 1024 * 1024
SERVER = "omero"
"""Status name of the stream to the server (`write_omero`)."""
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

    @classmethod
    def for_agent(cls, agent: EdgeAgent, **values: Any) -> OMEWriterConfig:
        """Defaults that keep the agent's own transport settings."""
        limit = agent.settings.bandwidth_limit_bytes_per_s
        base: dict[str, Any] = {
            "compression": "zstd" if agent.settings.codec is Codec.ZSTD else "none",
            "bandwidth_limit_mbps": None if limit is None else limit * 8 / 1_000_000,
        }
        return cls(**(base | values))


DEFAULT_OUTPUT_DIR: Path = OMEWriterConfig.model_fields["output_dir"].default


def apply_transport(agent: EdgeAgent, config: OMEWriterConfig) -> None:
    """Adopt a config that came from outside the process (the HTTP API's `set_config` calls
    this before it keeps the config): its output_dir is confined first, then its transport
    settings are applied."""
    confine_output_dir(agent, config)
    use_transport(agent, config)


def confine_output_dir(agent: EdgeAgent, config: OMEWriterConfig) -> None:
    """A remote caller must not make the agent write anywhere it can write: output_dir has to
    resolve (symlinks and `..` followed) under the agent's `local_output_root`. The built-in
    default is let through: no caller chose it, and refusing it would refuse every update of
    a fresh agent."""
    if config.output_dir == DEFAULT_OUTPUT_DIR:
        return
    root = agent.settings.local_output_root.resolve()
    if not config.output_dir.resolve().is_relative_to(root):
        raise PermanentError(
            f"output_dir {config.output_dir} is outside local_output_root {root}: choose a "
            "folder under it (local_output_root is set in the agent's settings)"
        )


def use_transport(agent: EdgeAgent, config: OMEWriterConfig) -> None:
    """Compression and the cap belong to the agent (they apply to everything it sends); the
    publisher reads its settings per message, so a swap takes effect on the next chunk."""
    update = {
        "codec": config.codec,
        "bandwidth_limit_bytes_per_s": config.bandwidth_limit_bytes_per_s,
    }
    if all(getattr(agent.settings, k) == v for k, v in update.items()):
        return
    settings = agent.settings.model_copy(update=update)
    agent.settings = settings
    agent.publisher.settings = settings

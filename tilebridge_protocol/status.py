"""Retained status messages for monitoring: one per device, per ingest instance, per image."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class _Status(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    at: datetime

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Liveness(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class BackendProgress(BaseModel):
    """One storage target of the device's current experiment (see docs/acquisition.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: UUID
    state: Literal["writing", "finished", "failed"]
    frames_total: int
    frames_written: int
    """Frames this target holds; for the server stream, frames it acknowledged."""
    frames_lost: int = 0
    """Frames handed over that this target will never hold (it failed)."""
    error: str | None = None
    location: str | None = None


class ExperimentSummary(BaseModel):
    """One experiment the device's agent still holds (see docs/acquisition.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: UUID
    experiment: str
    state: Literal["acquiring", "finalizing", "finalized", "aborted"]
    partial: bool = False
    """Closed with the frames it had (finalize --partial, or the abandoned policy)."""
    ended_by: str | None = None
    """Why the agent ended it itself, e.g. `abandoned after 12.0 h idle`."""
    frames_total: int
    frames_received: int
    server: Literal["off", "sending", "complete", "failed", "refused"]
    idle_s: float
    """Seconds since its last frame (or its start)."""


class DeviceStatus(_Status):
    """Published by the edge agent on `dev/<device>/status`; the last will says offline."""

    device: str
    state: Liveness
    buffered_tiles: int = 0
    buffered_bytes: int = 0
    oldest_pending_age_s: float | None = None
    inflight_tiles: int = 0
    images_pending: int = 0
    committed_tiles: int = 0
    retransmits: int = 0
    rejected_tiles: int = 0
    throughput_bytes_per_s: float = 0.0
    disk_free_bytes: int | None = None
    current_experiment: str | None = None
    broker_connected: bool = False
    last_error: str | None = None
    backends: dict[str, BackendProgress] = Field(default_factory=dict)
    """Per storage target (ome_tiff, ome_zarr, stitched_tiff, omero) of the current experiment."""
    agent_instance: str | None = None
    """Changes at every start of the agent: a client sees that the agent restarted."""
    agent_started_at: datetime | None = None
    experiments: list[ExperimentSummary] = Field(default_factory=list)
    """The experiments not yet done (newest first, at most 20): acquiring, idle, closing."""


class ImagePhase(StrEnum):
    """Where an image is in the ingest's lifecycle (docs/architecture.md draws it)."""

    RECEIVING = "receiving"
    """Open accepted; tiles arriving (and fed to the backends as they come)."""
    STORING = "storing"
    """Close in, every tile committed: the backends are finishing the image."""
    COMPLETE = "complete"
    """Every backend holds the image; the staged tiles are gone."""
    FAILED = "failed"
    """A backend refused the image for good, or the close contradicts staged tiles; the
    tiles stay staged for an administrator."""
    REJECTED = "rejected"
    """The open manifest was refused; nothing of the image is accepted."""
    EXPIRED = "expired"
    """No close and no tile for `image_ttl_s`: no longer counted as open. Committed tiles
    stay staged; the device revives the image by sending its open again."""
    DISCARDED = "discarded"
    """An administrator discarded the image and its staged tiles."""


class HeldImage(BaseModel):
    """An image whose tiles the ingest keeps staged for an administrator (see
    docs/operations.md): a failed one, or one its microscope never closed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str
    image_id: UUID
    image_name: str
    phase: ImagePhase
    reason: str | None = None
    detail: str | None = None
    staged_bytes: int = 0
    command: str | None = None
    """What to run about it, e.g. `server-ingest images retry scope-1/<uuid>`."""


class IngestStatus(_Status):
    """Published by an ingest instance on `ingest/<instance>/status`; the last will says offline."""

    instance: str
    state: Liveness
    broker_connected: bool = False
    images_in_progress: int = 0
    staging_bytes: int = 0
    tiles_committed: int = 0
    chunks_rejected: int = 0
    backends: dict[str, str] = Field(default_factory=dict)
    """Backend name -> "ok", or what is wrong: its last error, or the images that failed
    in it and are not resolved yet."""
    last_error: str | None = None
    images_failed: int = 0
    """Images failed and still staged (not retried or discarded yet)."""
    images_waiting: dict[str, int] = Field(default_factory=dict)
    """Backend name -> images whose write there waits for a retry (it is unreachable)."""
    attention: list[HeldImage] = Field(default_factory=list)
    """Failed and abandoned images still staged, newest first (at most 20)."""
    staging_free_bytes: int | None = None
    """Free space on the staging disk."""
    disk_pressure: Literal["none", "new_images_refused", "tiles_refused"] = "none"
    """What the ingest refuses because the staging disk is low (docs/operations.md)."""


class ImageStatus(_Status):
    """Published by the ingest on `image/<device>/<image_id>/status`."""

    device: str
    image_id: UUID
    experiment: str
    image_name: str
    phase: ImagePhase
    tiles_total: int
    tiles_received: int
    tiles_committed: int
    tiles_stored: int
    locations: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    staged_bytes: int = 0
    """Bytes of this image's tiles staged on the ingest's disk (0 once stored)."""
    digests: dict[str, str] = Field(default_factory=dict)
    """Backend -> digest of the pixels it was verified to hold (see `ImageAck.digests`)."""
    incomplete: bool = False
    """Closed as partial (the acquisition stopped early): stored with the tiles it has,
    `tiles_stored` of the planned ones, and flagged incomplete in every backend."""
    tiles_not_planned: int = 0
    """Of `tiles_total`, those at positions the close says were never planned (a round scan
    area's empty grid cells): not missing, so the image is complete without them."""

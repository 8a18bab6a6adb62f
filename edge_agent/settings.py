"""Edge agent settings: one typed model, read once at start-up, unknown keys refused.

Sources, first one winning: a JSON config file given with `--config`, environment variables
`TILEBRIDGE_EDGE_*` (nested with `__`, e.g. `TILEBRIDGE_EDGE_BROKER__HOST`), the defaults.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tilebridge_protocol.framing import DEFAULT_CHUNK_SIZE, Codec
from tilebridge_protocol.topics import check_device_id
from tilebridge_runtime.mqtt import BrokerSettings

MiB = 1024 * 1024
HOUR = 3600.0


class Abandoned(StrEnum):
    PARTIAL = "partial"
    """Close the image with the frames it has; the server marks it incomplete."""
    ABORT = "abort"
    """Discard it on the Pi (the server expires what it staged)."""
    KEEP = "keep"
    """Leave it open; it shows as idle on the status until someone ends it."""


class AbandonedPolicy(BaseModel):
    """What happens to an experiment whose acquisition stopped sending frames and never
    finalized (the program crashed, the user walked away)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_s: float = Field(default=12 * HOUR, gt=0)
    """Idle this long (since its last frame, or its start) counts as abandoned."""
    action: Abandoned = Abandoned.PARTIAL


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TILEBRIDGE_EDGE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    device_id: str = "scope-1"
    """This microscope's identity; also its MQTT username."""
    broker: BrokerSettings = BrokerSettings()
    spool_dir: Path = Path("/var/lib/tilebridge-edge/spool")
    """The durable disk buffer. Put it on the disk that should absorb a long outage."""
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=4096, le=4 * MiB)
    codec: Codec = Codec.RAW
    inflight_bytes: int = Field(default=64 * MiB, ge=MiB)
    """Tile bytes published but not yet committed by the server; bounds memory and the
    broker's queue for the ingest."""
    initial_window_bytes: int = Field(default=8 * MiB, ge=0)
    """Tile bytes in flight before the server granted a window (a `credit` ack, within one
    round trip of the first message): a whole fleet starting at once stays within the
    broker's bound. An ingest that grants no windows (`flow.enabled` off, or older than
    credits) leaves the agent at this: set it to `inflight_bytes` there."""
    commit_timeout_s: float = Field(default=30.0, gt=0)
    """Re-publish a tile that got no `committed` ack this long after it was sent."""
    max_commit_timeout_s: float = Field(default=600.0, gt=0)
    warn_after_sends: int = Field(default=10, ge=2)
    """A tile sent this often without a `committed` ack is named on the status topic (it keeps
    being sent: a poison message is reported, never silently dropped)."""
    status_interval_s: float = Field(default=5.0, gt=0)
    min_free_bytes: int = Field(default=512 * MiB, ge=0)
    """`write_frame` refuses a frame (TransientError) rather than fill the disk below this."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve Prometheus metrics on this port; None: no metrics endpoint."""
    metrics_host: str = "127.0.0.1"
    """The address the metrics endpoint listens on; `0.0.0.0` for every interface (then allow
    the port only from the Prometheus host in the firewall)."""
    bandwidth_limit_bytes_per_s: int | None = Field(default=None, gt=0)
    """Cap on bytes published per second (after compression); None: no cap."""
    http_host: str = "127.0.0.1"
    """The local HTTP API (edge_agent.http); anything but loopback requires a token."""
    http_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve the local HTTP API on this port; None: no HTTP API."""
    http_token: SecretStr | None = None
    http_token_file: Path | None = None
    """Read the HTTP API token from this file (preferred over `http_token` in config files)."""
    local_output_root: Path = Path("/var/lib/tilebridge-edge/local")
    """Local targets write only under this folder (whoever asks: HTTP, fast path, Python)."""
    http_allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
    """Host header values the HTTP API answers (DNS rebinding); http_host is added."""
    local_socket: Path | None = None
    """The fast local path's socket (edge_agent.fastpath); None: `<spool_dir>/acquire.sock`.
    Whoever may connect to it may acquire: it is made mode 0660; give its folder to the
    acquisition program's group."""
    fast_path: bool = True
    """Serve the fast local path (off: only the HTTP API and the in-process API)."""
    acquisition_memory_bytes: int = Field(default=1024 * MiB, ge=16 * MiB)
    """What the front door may hold in memory: frames being received (at most half of it)
    and frames queued for local targets (the other half). A frame larger than a quarter of
    it is refused when the experiment starts."""
    experiment_retention_s: float = Field(default=7 * 24 * HOUR, ge=0)
    """How long a finished experiment still answers GET /experiments/{id}."""
    abandoned: AbandonedPolicy = AbandonedPolicy()

    @property
    def socket_path(self) -> Path:
        return self.local_socket or self.spool_dir / "acquire.sock"

    @property
    def max_frame_bytes(self) -> int:
        return self.acquisition_memory_bytes // 4

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return check_device_id(value)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> AgentSettings:
        values: dict[str, Any] = {}
        if config_file is not None:
            values = json.loads(config_file.read_text())
        values.update(overrides)
        return cls(**values)

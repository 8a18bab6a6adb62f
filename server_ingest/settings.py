"""Ingest settings: one typed model, read once at start-up, unknown keys refused.

Sources, first one winning: a JSON config file given with `--config`, environment variables
`TILEBRIDGE_INGEST_*` (nested with `__`), the defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server_ingest.destinations import Route
from tilebridge_protocol.messages import MAX_JSON_BYTES
from tilebridge_protocol.topics import check_device_id
from tilebridge_runtime.mqtt import BrokerSettings
from tilebridge_storage.omero_backend.settings import OmeroSettings

MiB = 1024 * 1024


class Limits(BaseModel):
    """What one image and one device may ask of this server (docs/security.md: each limit,
    what trips it and what an admin sees). Every limit is checked before the work it bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_chunk_bytes: int = Field(default=8 * MiB, ge=4096)
    max_chunks_per_tile: int = Field(default=65536, ge=1)
    max_tile_bytes: int = Field(default=512 * MiB, ge=1)
    max_tiles_per_image: int = Field(default=100_000, ge=1)
    max_image_bytes: int = Field(default=1024 * 1024 * MiB, ge=1)
    max_partial_tiles_per_device: int = Field(default=512, ge=1)
    """Tiles being reassembled at once per device; more is refused until some complete."""
    max_staged_bytes_per_device: int = Field(default=2048 * 1024 * MiB, ge=1)
    max_open_images_per_device: int = Field(default=32, ge=1)
    """Images receiving at once per device (opened, not yet closed and stored)."""
    max_declared_bytes_per_device: int = Field(default=2048 * 1024 * MiB, ge=1)
    """Sum of the declared sizes of a device's receiving images."""
    max_manifest_bytes_per_device: int = Field(default=16 * MiB, ge=MAX_JSON_BYTES)
    """Open manifests a device's images keep in memory, counted as their JSON size (in
    memory a manifest takes about 11 times its JSON size)."""
    message_rate_per_device: float = Field(default=2000.0, gt=0)
    """Messages per second per device (token bucket), sustained: 1 MiB chunks at 2 GB/s."""
    message_burst_per_device: int = Field(default=4000, ge=1)
    refusals_answered_per_s_per_device: float = Field(default=200.0, gt=0)
    """Refusals answered per second per device (burst: twice that); beyond it a flood of bad
    messages is counted and logged but not answered one by one."""
    json_bytes_per_s_per_device: float = Field(default=1 * MiB, gt=0)
    """Open and close manifests cost parsing time: bytes per second per device, sustained."""
    json_burst_bytes_per_device: int = Field(default=8 * MiB, ge=MAX_JSON_BYTES)
    max_parked_bytes_per_device: int = Field(default=256 * MiB, ge=MAX_JSON_BYTES)
    """Messages held while the ledger is asked about their image (milliseconds, normally)."""
    image_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    """A receiving image without a tile or a close for this long expires (revivable)."""


class Retention(BaseModel):
    """How long staged tiles are kept, and what is refused when the staging disk runs low
    (docs/operations.md, "Disk and retention")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stored_s: float | None = Field(default=None, gt=0)
    """With `keep_staged`: the staged copy of a stored image is removed this long after it
    was stored. None: kept until the disk runs low (it is the first thing removed then)."""
    failed_s: float | None = Field(default=None, gt=0)
    """A failed image is discarded this long after it failed. None: kept until an admin
    retries or discards it (the default: nothing unstored is removed behind anyone's back)."""
    abandoned_s: float | None = Field(default=30 * 24 * 3600.0, gt=0)
    """An expired image (its microscope never closed it) is discarded this long after it
    expired. None: kept until an admin acts."""
    reserve_bytes: int = Field(default=4 * 1024 * MiB, ge=0)
    """Free space on the staging disk below which new images are refused (`unavailable`):
    the images already receiving go on and finish."""
    floor_bytes: int = Field(default=1024 * MiB, ge=0)
    """Free space below which chunks are refused too (`unavailable`): nothing new is staged;
    acks, storing and the ledger go on, and storing frees space."""
    check_interval_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Retention:
        if self.floor_bytes > self.reserve_bytes:
            raise ValueError("retention.floor_bytes must not exceed retention.reserve_bytes")
        return self


class Preview(BaseModel):
    """The live mosaic preview on the dashboard (server_ingest/preview.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_px: int = Field(default=512, ge=16, le=4096)
    """Longest side of the preview, in pixels."""
    images: int = Field(default=8, ge=1, le=256)
    """Images previewed at once (the least recently updated goes first)."""
    interval_s: float = Field(default=2.0, gt=0)
    """Shortest time between two previews of one image."""


class SqliteLedgerSettings(BaseModel):
    """The embedded ledger (the default): one SQLite file in `data_dir`, one host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sqlite"] = "sqlite"


class PostgresLedgerSettings(BaseModel):
    """A PostgreSQL ledger, shared by every instance of a deployment (docs/scale.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["postgres"]
    dsn: SecretStr | None = None
    """A libpq connection string or URI (`host=db port=5432 dbname=tilebridge user=ingest`)."""
    dsn_file: Path | None = None
    """Read the connection string from this file (preferred: it may hold a password)."""
    pool_size: int = Field(default=4, ge=2, le=64)
    """Connections: the ledger writer, the claims thread and the storer workers share them."""
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _one_dsn(self) -> PostgresLedgerSettings:
        if (self.dsn is None) == (self.dsn_file is None):
            raise ValueError("give the PostgreSQL ledger exactly one of dsn and dsn_file")
        return self

    def secret_dsn(self) -> str:
        if self.dsn_file is not None:
            return self.dsn_file.read_text().strip()
        assert self.dsn is not None
        return self.dsn.get_secret_value()


class ClusterSettings(BaseModel):
    """How instances share the devices (docs/scale.md). Only with a PostgreSQL ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subscription: Literal["exclusive", "shared"] = "exclusive"
    """`shared`: subscribe as a member of the MQTT 5 shared subscription `$share/<group>/`,
    so the broker spreads device messages over every instance of the group."""
    share_group: str = "tilebridge"
    lease_s: float = Field(default=30.0, ge=2.0, le=3600.0)
    """A device's (and an image store's) claim lasts this long unless renewed (every quarter
    of it); an instance that could not renew for half of it stops (exit 70), so a dead or cut
    off instance's devices are taken over after at most this long."""
    relay_ttl_s: int = Field(default=120, ge=1)
    """A message relayed to the instance that holds its device expires in the broker after
    this long (the device sends it again if it is lost)."""

    @field_validator("share_group")
    @classmethod
    def _group(cls, value: str) -> str:
        return check_device_id(value)


class FlowSettings(BaseModel):
    """Fleet-level flow control: how many tile bytes each device may have in flight, granted
    on its ack topic (docs/protocol.md, "Credits")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Grant windows. An agent older than credits cannot read a `credit` ack (it logs it
    and goes on with its own `inflight_bytes`); off: no windows at all (agents then stay at
    their `initial_window_bytes`)."""
    broker_bytes: int = Field(default=256 * MiB, ge=MiB)
    """Tile bytes this instance lets its devices have in flight at once, all together: what
    they may queue in the broker for it. Divided among the devices sending lately."""
    min_window_bytes: int = Field(default=2 * MiB, ge=64 * 1024)
    """No device gets less (one tile goes anyway, alone, whatever its size)."""
    max_window_bytes: int = Field(default=64 * MiB, ge=64 * 1024)
    active_s: float = Field(default=30.0, gt=0)
    """A device that sent nothing for this long no longer counts as sharing the budget."""


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TILEBRIDGE_INGEST_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    instance: str = "ingest-1"
    broker: BrokerSettings = BrokerSettings()
    data_dir: Path = Path("/var/lib/tilebridge-ingest")
    """Holds `staging/`, `ledger.sqlite` and (by default) `archive/`."""
    staging_root: Path | None = None
    """Where tiles are staged; defaults to `data_dir/staging`. With several instances, one
    folder every instance reaches (a takeover reads what another instance staged)."""
    archive_dir: Path | None = None
    """Where the local archive writes; defaults to `data_dir/archive`."""
    backends: tuple[str, ...] = ("archive",)
    keep_staged: bool = False
    """Keep staged tiles after every backend stored the image (for audits or re-exports);
    `retention.stored_s` says for how long."""
    retention: Retention = Retention()
    preview: Preview = Preview()
    omero: OmeroSettings | None = None
    """Where and how the `omero` backend writes (pure settings: no omero-py import)."""
    omero_targets: dict[str, OmeroSettings] = Field(default_factory=dict)
    """Several OMERO servers, by name (instead of `omero`): each with its own credentials,
    device policies and health; `routes` says which images go where (docs/omero.md)."""
    routes: tuple[Route, ...] = ()
    """First match wins: device / experiment / project patterns -> an `omero_targets` name."""
    limits: Limits = Limits()
    status_interval_s: float = Field(default=5.0, gt=0)
    image_status_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    """Retained status of a finished image expires from the broker after this long."""
    store_retry_s: float = Field(default=5.0, gt=0)
    store_retry_max_s: float = Field(default=300.0, gt=0)
    verify_attempts: int = Field(default=3, ge=1, le=100)
    """Writes of one image into one backend whose read-back must match before the image
    fails with `verify_failed`."""
    inbox_messages: int = Field(default=256, ge=1)
    """Device messages waiting for the core; when full, the broker connection waits."""
    staging_workers: int = Field(default=2, ge=1, le=64)
    storer_workers: int = Field(default=2, ge=1, le=64)
    dead_letters_max: int = Field(default=1000, ge=1)
    dead_letter_payload_bytes: int = Field(default=64 * 1024, ge=0)
    """How much of a dead-lettered message is kept (its full size is recorded)."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve Prometheus metrics on this port; None: no metrics endpoint."""
    metrics_host: str = "127.0.0.1"
    """The address the metrics endpoint listens on; `0.0.0.0` for every interface (then allow
    the port only from the Prometheus host in the firewall)."""
    control_socket: Path | None = None
    """The Unix socket `server-ingest images` and `device remove` reach the running ingest
    through; defaults to `data_dir/control.sock`."""
    ledger: SqliteLedgerSettings | PostgresLedgerSettings = Field(
        default=SqliteLedgerSettings(), discriminator="kind"
    )
    cluster: ClusterSettings = ClusterSettings()
    flow: FlowSettings = FlowSettings()

    @model_validator(mode="after")
    def _shared_needs_postgres(self) -> IngestSettings:
        if self.cluster.subscription == "shared" and self.ledger.kind != "postgres":
            raise ValueError(
                "cluster.subscription 'shared' needs a ledger every instance reaches: "
                "ledger.kind 'postgres' (docs/scale.md)"
            )
        if self.flow.min_window_bytes > self.flow.max_window_bytes:
            raise ValueError("flow.min_window_bytes is above flow.max_window_bytes")
        return self

    @field_validator("instance")
    @classmethod
    def _instance(cls, value: str) -> str:
        return check_device_id(value)

    @model_validator(mode="after")
    def _targets(self) -> IngestSettings:
        if self.omero_targets and self.omero is not None:
            raise ValueError("give either `omero` (one server) or `omero_targets`, not both")
        for name in self.omero_targets:
            check_device_id(name)  # a metric label, a thread name, a key in status
            if name in self.backends and name != "omero":
                raise ValueError(f"OMERO target {name!r} has the name of a backend kind")
        if self.omero_targets and "omero" not in self.backends:
            raise ValueError("`omero_targets` are written only with 'omero' in `backends`")
        known = set(self.omero_targets) or ({"omero"} if self.omero else set())
        unknown = sorted({r.target for r in self.routes} - known)
        if unknown:
            raise ValueError(f"routes name unknown OMERO targets {unknown}; known {sorted(known)}")
        return self

    @property
    def staging_dir(self) -> Path:
        return self.staging_root or self.data_dir / "staging"

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite"

    @property
    def lock_path(self) -> Path:
        """Held by the one process that owns this data directory (service or admin command)."""
        return self.data_dir / "ingest.lock"

    @property
    def control_path(self) -> Path:
        return self.control_socket or self.data_dir / "control.sock"

    @property
    def archive_root(self) -> Path:
        return self.archive_dir or self.data_dir / "archive"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> IngestSettings:
        values: dict[str, Any] = {}
        if config_file is not None:
            values = json.loads(config_file.read_text())
        values.update(overrides)
        return cls(**values)

"""Dashboard settings: one typed model, read once at start-up, unknown keys refused.

Sources, first one winning: a JSON config file given with `--config`, environment variables
`TILEBRIDGE_DASHBOARD_*` (nested with `__`), the defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tilebridge_runtime.mqtt import BrokerSettings


class DashboardSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TILEBRIDGE_DASHBOARD_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    broker: BrokerSettings = BrokerSettings()
    """A broker identity whose ACL allows reading the status topics and nothing else."""
    client_id: str = Field(default="tb-dashboard", min_length=1, max_length=64)
    """Unique per dashboard instance: the broker disconnects an older client with the same id."""
    listen_host: str = "127.0.0.1"
    """The page has no login of its own: keep it on loopback behind an authenticating proxy."""
    listen_port: int = Field(default=8090, ge=1, le=65535)
    omero_web_url: str | None = None
    """OMERO.web base address (e.g. `https://omero.example.org`); images stored in OMERO
    link to it. None: no links."""
    omero_web_urls: dict[str, str] = Field(default_factory=dict)
    """With several OMERO servers: OMERO.web per target (the ingest's `omero_targets` name);
    a target not named here links to `omero_web_url`."""
    device_stale_s: float = Field(default=60.0, gt=0)
    """A microscope (or ingest) without a status message for this long shows offline: its
    agent publishes one every few seconds, and a revoked or cut-off one leaves its last
    `online` retained with no will (the broker drops it without publishing it)."""

    @field_validator("omero_web_url")
    @classmethod
    def _omero_web_url(cls, value: str | None) -> str | None:
        return None if value is None else _web(value)

    @field_validator("omero_web_urls")
    @classmethod
    def _omero_web_urls(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: _web(url) for name, url in value.items()}

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> DashboardSettings:
        values: dict[str, Any] = {}
        if config_file is not None:
            values = json.loads(config_file.read_text())
        values.update(overrides)
        return cls(**values)


def _web(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("OMERO.web addresses must start with http:// or https://")
    return value.rstrip("/")

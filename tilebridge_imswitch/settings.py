"""The adapter's settings, and what it takes from ImSwitch's own OMERO configuration.

Settings come from a JSON file (`TILEBRIDGE_IMSWITCH_CONFIG`, default
`/etc/tilebridge/imswitch.json` when it exists), then environment variables
`TILEBRIDGE_IMSWITCH_*`, then the defaults; unknown keys are refused.

The server stream is on when these settings say so (`stream_to_server`), whatever ImSwitch's
`write_omero` and OMERO connection parameters say: the Pi holds no OMERO credentials, the
tilebridge server does. ImSwitch's setup JSON (`imswitch_setup`) and the
`omero_connection_params` ImSwitch hands its writer are read for targets only: where the
image should go (project and dataset), which OMERO server ImSwitch meant (a key-value, for
the record), whether OMERO was enabled. A password found in either is ignored with a warning;
it is never stored, logged or returned.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import Name

log = logging.getLogger(__name__)

CONFIG_ENV = "TILEBRIDGE_IMSWITCH_CONFIG"
DEFAULT_CONFIG = Path("/etc/tilebridge/imswitch.json")
PASSWORD_KEYS = ("omeroPassword", "password", "passwd")


class AdapterSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TILEBRIDGE_IMSWITCH_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    edge: Literal["fastpath", "in_process"] = "fastpath"
    """How to reach the agent: `fastpath` (the `edge-agent run` service's front door over
    its local socket `edge_socket`; the agent keeps streaming while ImSwitch restarts), or
    `in_process` (an agent inside ImSwitch's process, configured by `agent_config`). Either
    way the agent writes ImSwitch's local files and keeps each frame's measured metadata."""
    edge_socket: Path = Path("/run/tilebridge-edge/acquire.sock")
    """The agent's `local_socket`."""
    agent_config: Path | None = None
    """The agent settings file for `edge: in_process` (the agent's own edge.json)."""
    stream_to_server: bool = True
    """Send every frame to the tilebridge server (which writes OMERO and its archive)."""
    local_files: bool = True
    """Write ImSwitch's local files (OME-Zarr for the live view, TIFFs) as it configures them."""
    project: Name = "imswitch"
    """OMERO project on the server (unless ImSwitch's settings name one)."""
    dataset: Name | None = None
    """OMERO dataset; None: one per ImSwitch experiment (its folder name), or per plate."""
    imswitch_setup: Path | None = None
    """ImSwitch's setup JSON, read for its OMERO targets (never for credentials)."""
    retry_for_s: float = Field(default=60.0, ge=0)
    """How long a frame is retried while the agent says "try again" before it is refused."""
    finalize_grace_s: float = Field(default=2.0, ge=0)
    """When frames are missing at finalize, wait until none arrived for this long: ImSwitch
    may still hold some in its frame-saver queue."""
    finalize_timeout_s: float = Field(default=600.0, gt=0)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> AdapterSettings:
        path = config_file or _config_path()
        values: dict[str, Any] = {}
        if path is not None:
            try:
                values = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise PermanentError(
                    f"cannot read the ImSwitch adapter settings {path}: {exc}"
                ) from None
        values.update(overrides)
        return cls(**values)


class OmeroTargets(BaseModel):
    """What ImSwitch's OMERO configuration says about where images go."""

    model_config = ConfigDict(frozen=True)

    enabled: bool | None = None
    server: str | None = None
    project_id: int | None = None
    dataset_id: int | None = None
    group_id: int | None = None

    def key_values(self) -> dict[str, str]:
        """For the record on every image: what ImSwitch was configured to use."""
        out = {}
        if self.server:
            out["imswitch_omero_server"] = self.server
        for name in ("project_id", "dataset_id", "group_id"):
            value = getattr(self, name)
            if value is not None and value >= 0:
                out[f"imswitch_omero_{name}"] = str(value)
        return out


def setup_targets(path: Path | None) -> OmeroTargets:
    """The OMERO keys of ImSwitch's setup JSON (top level or its `experiment` section)."""
    if path is None:
        return OmeroTargets()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot read the ImSwitch setup {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PermanentError(f"the ImSwitch setup {path} is not a JSON object")
    section = data.get("experiment")
    return _targets(section if isinstance(section, dict) else data, f"ImSwitch setup {path}")


def connection_targets(params: Any) -> OmeroTargets:
    """ImSwitch's `OMEROConnectionParams` (or a dict of them), read duck-typed."""
    if params is None:
        return OmeroTargets()
    if not isinstance(params, dict):
        names = ("host", "port", "password", "group_id", "project_id", "dataset_id")
        params = {n: getattr(params, n, None) for n in names}
    host = params.get("host")
    renamed = {
        "omeroServerUrl": host,
        "omeroProjectId": params.get("project_id"),
        "omeroDatasetId": params.get("dataset_id"),
        "omeroGroupId": params.get("group_id"),
        "omeroPassword": params.get("password"),
    }
    return _targets(renamed, "ImSwitch's OMERO connection parameters")


def merged(first: OmeroTargets, second: OmeroTargets) -> OmeroTargets:
    """`first`, with what it leaves open taken from `second`."""
    values = second.model_dump() | {k: v for k, v in first.model_dump().items() if v is not None}
    return OmeroTargets(**values)


def _targets(section: dict[str, Any], where: str) -> OmeroTargets:
    if any(section.get(key) for key in PASSWORD_KEYS):
        # Named without its value: the value goes nowhere, not even into this warning.
        log.warning(
            "%s holds an OMERO password: ignored. tilebridge sends images to its server, which "
            "logs in to OMERO itself; remove the password from the Pi",
            where,
        )
    return OmeroTargets(
        enabled=_flag(section.get("omeroEnabled")),
        server=_text(section.get("omeroServerUrl")),
        project_id=_id(section.get("omeroProjectId")),
        dataset_id=_id(section.get("omeroDatasetId")),
        group_id=_id(section.get("omeroGroupId")),
    )


def _config_path() -> Path | None:
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)[:256]


def _id(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None

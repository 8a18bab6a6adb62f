"""OMERO connection settings and the per-device write policy.

Pure pydantic: importing this module never imports omero-py, so the ingest's settings can
name an `omero` section on machines without the `[omero]` extra.

Who writes: every device writes with the credentials of its policy when the policy names a
`username`, else with the server-wide ones. One OMERO login per distinct account is kept
alive and shared by the writers of that account. (Writing *as* another user through an
admin's `suConn` is not offered: it needs a full admin account on the ingest host, while a
per-device account needs nothing beyond ordinary group membership.)
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from tilebridge_protocol.errors import PermanentError
from tilebridge_runtime.secrets import secret_file_problem

log = logging.getLogger(__name__)


class Credentials(BaseModel):
    """One OMERO account. Its repr masks the password; the file is read at each login."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: Path | None = None
    """A file holding the password (preferred: it keeps the secret out of configs)."""
    group: str | None = None
    """The OMERO group to write in; None: the account's default group."""

    @model_validator(mode="after")
    def _one_password(self) -> Credentials:
        if (self.password is None) == (self.password_file is None):
            raise ValueError(f"OMERO user {self.username}: give password or password_file")
        return self

    def secret(self) -> str:
        if self.password is not None:
            return self.password.get_secret_value()
        assert self.password_file is not None
        try:
            problem = secret_file_problem(self.password_file)
            value = self.password_file.read_text().strip()
        except OSError as exc:
            # The error names the file only; its content never reaches a message.
            raise PermanentError(
                f"cannot read the OMERO password file {self.password_file}: {exc.strerror}"
            ) from None
        if problem:
            log.warning("OMERO password file: %s", problem)
        if not value:
            raise PermanentError(f"the OMERO password file {self.password_file} is empty")
        return value

    @property
    def account(self) -> tuple[str, str | None]:
        """What tells logins apart (sessions are shared per account)."""
        return (self.username, self.group)


class DevicePolicy(BaseModel):
    """What one device may do in OMERO. Patterns are shell-style (`fnmatch`, case-sensitive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str | None = None
    """Write as this OMERO user (with `password`/`password_file`); None: the server-wide one."""
    password: SecretStr | None = None
    password_file: Path | None = None
    group: str | None = None
    """Write in this group. None: with the policy's own account, that account's default
    group; else the group of the server-wide settings."""
    projects: tuple[str, ...] = ("*",)
    """Project names the device may write into."""
    datasets: tuple[str, ...] = ("*",)
    """Dataset names the device may write into."""
    may_create: bool = False
    """Create a missing dataset (e.g. one per experiment) inside an allowed project."""
    may_create_project: bool = False
    """Create a missing project too."""

    @model_validator(mode="after")
    def _own_account(self) -> DevicePolicy:
        has_password = self.password is not None or self.password_file is not None
        if has_password and self.username is None:
            raise ValueError("a policy password needs a policy username")
        if self.username is not None:
            Credentials(
                username=self.username, password=self.password, password_file=self.password_file
            )
        return self

    def check_target(self, device: str, project: str, dataset: str) -> None:
        """Raise PermanentError unless the device may write to project/dataset."""
        for kind, name, patterns in (
            ("project", project, self.projects),
            ("dataset", dataset, self.datasets),
        ):
            if not _matches(name, patterns):
                raise PermanentError(
                    f"OMERO policy: device {device} may not write to {kind} {name!r} "
                    f"(allowed: {', '.join(patterns) or 'none'})"
                )


class OmeroSettings(BaseModel):
    """Where OMERO is, who the ingest logs in as, and which device may write where."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(default=4064, ge=1, le=65535)
    secure: bool = False
    """Keep every call on the encrypted connection (login is always encrypted). False, as
    in BlitzGateway, moves to the server's `omero.router.insecure` after login."""
    username: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: Path | None = None
    group: str | None = None
    devices: dict[str, DevicePolicy] = Field(default_factory=dict)
    default_policy: DevicePolicy | None = None
    """The policy of devices not named in `devices`; None refuses them."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    call_timeout_s: float = Field(default=120.0, gt=0)
    """Longest wait for any one call; a timed-out call is retried later (TransientError)."""
    keepalive_s: float | None = Field(default=60.0, gt=0)
    """Ping each session this often (OMERO drops sessions idle ~10 min); None: never."""
    delete_timeout_s: float = Field(default=300.0, gt=0)
    """Longest wait for OMERO to delete an earlier partial image."""
    max_call_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=32 * 1024 * 1024)
    """Largest pixel buffer sent in one call (OMERO refuses messages above 64 MB)."""
    verify: bool = True
    """Before `complete`: compare OMERO's digest of each image (calculateMessageDigest) with
    the digest of the pixels written; a mismatch deletes and rewrites the image."""
    verify_wait_s: float = Field(default=300.0, gt=0)
    """Longest wait for OMERO to finish a pyramid before its digest can be read."""

    @model_validator(mode="after")
    def _password(self) -> OmeroSettings:
        self.credentials  # noqa: B018 - validates that exactly one password source is given
        return self

    @property
    def credentials(self) -> Credentials:
        return Credentials(
            username=self.username,
            password=self.password,
            password_file=self.password_file,
            group=self.group,
        )

    def policy_for(self, device: str) -> DevicePolicy:
        policy = self.devices.get(device, self.default_policy)
        if policy is None:
            raise PermanentError(f"OMERO policy: device {device} is not allowed to write to OMERO")
        return policy

    def credentials_for(self, policy: DevicePolicy) -> Credentials:
        if policy.username is None:
            if policy.group is None:
                return self.credentials
            return self.credentials.model_copy(update={"group": policy.group})
        return Credentials(
            username=policy.username,
            password=policy.password,
            password_file=policy.password_file,
            group=policy.group,
        )


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

"""Keeping secrets out of logs, status messages and configuration dumps.

Secrets (broker passwords, OMERO credentials, tokens) live in files of mode 600 or in the
environment and reach the code as `SecretStr` or through `*_file` settings. Whatever shows
settings to a human goes through `masked()`: `SecretStr` values and every field whose name
says it holds a secret are replaced by `MASK`; paths to secret files stay visible, since a
path is what an admin needs to debug a configuration.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

MASK = "**********"

_SECRET_NAME = re.compile(r"(password|passwd|secret|token|credential|api_?key|private_?key)$", re.I)
_PATH_NAME = re.compile(r"(_file|_path|_dir)$")


def is_secret_name(name: str) -> bool:
    """A field name that holds a secret value (not a path to one)."""
    return bool(_SECRET_NAME.search(name)) and not _PATH_NAME.search(name)


def masked(model: BaseModel) -> dict[str, Any]:
    """The settings as JSON-compatible data with every secret replaced by `MASK`."""
    return _mask(model.model_dump(mode="python"))  # type: ignore[no-any-return]


def masked_json(model: BaseModel, indent: int | None = 2) -> str:
    return json.dumps(masked(model), indent=indent, default=str)


def _mask(value: Any, name: str = "") -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, name) for v in value]
    if is_secret_name(name) and value not in (None, ""):
        return MASK
    if isinstance(value, Path):
        return str(value)
    return value


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of a (non-trivial) secret replaced by `MASK`."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A log filter that masks known secret values in every record passing through it.

    Defence in depth only: code must not log secrets in the first place.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact(message, self.secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


def secret_file_problem(path: Path) -> str | None:
    """Why a secret file is unsafe (readable or writable by others), or None."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & 0o077:
        return f"{path} is accessible by group or others (mode {st.st_mode & 0o777:o}); use 600"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this service"
    return None

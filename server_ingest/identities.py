"""Broker identities: what a name may be, and the two files Mosquitto reads them from.

A name is a role (`ingest`, `ingest-<n>` and `monitor`, `monitor-<n>` are reserved for the
services; anything else is a device id, never a lookalike of those), an entry in the password
file and, for the services, a block in the ACL. The password file is Mosquitto 2's own
format, `name:$7$<iterations>$<salt>$<hash>` with PBKDF2-HMAC-SHA512, written here directly
rather than with `mosquitto_passwd -b`, which would put the password on a command line that
every local user can read in /proc. Files are replaced atomically and keep their owner and
mode. The commands that use this are in `server_ingest/admin.py`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import grp
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.topics import check_device_id

# Generated passwords carry 256 bits of entropy, so the iteration count is not what protects
# them; it only has to stay cheap for the broker, which hashes on every CONNECT.
PBKDF2_ITERATIONS = 1000
SALT_BYTES = 12

_HASH = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


class AdminError(Exception):
    """A refused admin command; the message says why."""


class Role(StrEnum):
    DEVICE = "device"
    INGEST = "ingest"
    MONITOR = "monitor"


def role_of(name: str) -> Role:
    """`ingest`, `ingest-*`, `monitor` and `monitor-*` are reserved; anything else is a device."""
    for role in (Role.INGEST, Role.MONITOR):
        if name == role.value or name.startswith(f"{role.value}-"):
            return role
    return Role.DEVICE


def lookalike_of(name: str) -> Role | None:
    """The service role a device name could pass for: a reserved name in other letter case,
    or followed by another separator or directly by a digit (`Ingest`, `INGEST-2`,
    `ingest.2`, `monitor_1`, `monitor1`). Words that merely start the same (`monitoring`,
    `ingester`) are not lookalikes."""
    folded = name.casefold()
    for role in (Role.INGEST, Role.MONITOR):
        rest = folded.removeprefix(role.value)
        if rest != folded and (not rest or rest[0] in "-_." or rest[0].isdigit()):
            return role
    return None


def check_name(name: str, role: Role = Role.DEVICE) -> str:
    """`name` if it may be created as an identity of `role`; AdminError says why not."""
    check_device_name(name)
    if role_of(name) is not role:
        if role is Role.DEVICE:
            raise AdminError(f"{name!r} is reserved for the {role_of(name)} role, not a device")
        raise AdminError(f"a {role} identity must be named {role} or {role}-<suffix>")
    if name == f"{role.value}-":
        raise AdminError(f"a {role} identity must be named {role} or {role}-<suffix>")
    if role is Role.DEVICE and (service := lookalike_of(name)) is not None:
        raise AdminError(
            f"{name!r} looks like the reserved {service} identity: device ids must not differ "
            f"from {service!r} or {service + '-<n>'!r} only in letter case or separator, so "
            "that no microscope can pass for a service in logs, the ACL or the dashboard"
        )
    return name


def check_device_name(name: str) -> str:
    """`name` if it can be a topic level and a file name (tilebridge_protocol.topics), of any
    role and lookalikes included: what an existing identity must be to be removed."""
    try:
        return check_device_id(name)
    except ProtocolError as exc:
        raise AdminError(exc.detail) from None


# -- password hashes --------------------------------------------------------------------------


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password hash (`$7$`: PBKDF2-HMAC-SHA512, base64 salt and hash)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    match = _HASH.fullmatch(encoded)
    if match is None:
        return False
    iterations, salt, digest = match.groups()
    computed = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(iterations)
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


def new_password() -> str:
    """256 random bits, URL-safe: no ':' or whitespace to break a file or a command line."""
    return secrets.token_urlsafe(32)


# -- files --------------------------------------------------------------------------------------


def read_password_file(path: Path) -> dict[str, str]:
    """Username -> hash, in file order."""
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            name, encoded = line.split(":", 1)
            entries[name] = encoded
    return entries


def replace_file(path: Path, text: str, new_mode: int = 0o640) -> None:
    """Write `text` to `path` atomically, keeping the owner and mode of an existing file.

    A new file is readable by the `mosquitto` group only (the broker drops root before it
    reads its files), never by everyone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, (st.st_mode & 0o7777) if st else new_mode)
        if st is not None:
            with contextlib.suppress(PermissionError):
                os.chown(tmp, st.st_uid, st.st_gid)
        elif os.geteuid() == 0:
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(tmp, 0, grp.getgrnam("mosquitto").gr_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_password_file(path: Path, entries: dict[str, str]) -> None:
    replace_file(path, "".join(f"{name}:{encoded}\n" for name, encoded in entries.items()))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One admin command at a time per password file."""
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def set_identity(path: Path, name: str, password: str) -> bool:
    """Create or replace `name`'s password; True if it existed (a rotation)."""
    with locked(path):
        entries = read_password_file(path)
        existed = name in entries
        entries[name] = hash_password(password)
        write_password_file(path, entries)
    return existed


def remove_identity(path: Path, name: str) -> bool:
    with locked(path):
        entries = read_password_file(path)
        if entries.pop(name, None) is None:
            return False
        write_password_file(path, entries)
    return True


def write_secret(path: Path, secret: str) -> None:
    """A file only its owner can read (mode 600 from the start, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secret + "\n")


# -- ACL ----------------------------------------------------------------------------------------


def _user_block(lines: list[str], name: str) -> tuple[int, int] | None:
    """Line range of `user <name>` and its `topic` lines (up to the next user/pattern)."""
    for i, line in enumerate(lines):
        if line.split() == ["user", name]:
            end = i + 1
            while end < len(lines) and not lines[end].lstrip().startswith(("user ", "pattern ")):
                end += 1
            while end > i + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
                end -= 1  # leave comments that belong to the next block
            return i, end
    return None


def acl_add_user(text: str, name: str, role: Role) -> str:
    """The ACL with a `user <name>` block copied from the `user <role>` template block.

    Devices need no ACL entry (the `%u` patterns cover every username); an extra ingest or
    monitor instance gets the same rights as `ingest` or `monitor`, its own tree denied.
    """
    if role is Role.DEVICE:
        return text
    lines = text.splitlines()
    if _user_block(lines, name) is not None:
        return text
    template = _user_block(lines, role.value)
    if template is None:
        raise AdminError(f"the ACL has no 'user {role.value}' block to copy")
    start, end = template
    own = f"/dev/{role.value}/"
    block = [f"user {name}"] + [
        line.replace(own, f"/dev/{name}/") for line in lines[start + 1 : end] if line.strip()
    ]
    tail = "" if text.endswith("\n") or not text else "\n"
    return f"{text}{tail}\n# added by `server-ingest device add {name} --role {role}`\n" + (
        "\n".join(block) + "\n"
    )


def acl_remove_user(text: str, name: str) -> str:
    """The ACL without `name`'s block (the `ingest` and `monitor` templates stay)."""
    if name in (Role.INGEST.value, Role.MONITOR.value):
        return text
    lines = text.splitlines()
    found = _user_block(lines, name)
    if found is None:
        return text
    start, end = found
    if start > 0 and lines[start - 1].startswith("# added by `server-ingest device add"):
        start -= 1
    kept = lines[:start] + lines[end:]
    return "\n".join(kept).rstrip("\n") + "\n"

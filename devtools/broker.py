"""Start a real Mosquitto from the repository's own configuration on a free loopback port.

Used by the tests, the demo and the benchmarks. The broker gets the tile-traffic settings
from `mosquitto/tilebridge.conf` (unchanged, or with named values changed by `settings=`, e.g.
a small queue limit for a test); only the listener, the persistence directory and the log
file are chosen here.

Secured mode (`identities=` or `Mosquitto.secured(...)`) is production's authentication and
authorisation: the listeners of `mosquitto/mosquitto.conf` rendered by
`devtools/broker_config.py` (only their ports, addresses and file paths moved, so client ids
are bound to usernames and TLS requires a client certificate exactly as in production), a
password file made with `mosquitto_passwd` holding the given identities, the repository's
`mosquitto/acl`, and, with `tls=True`, the TLS listener with certificates from
`scripts/make_certs.sh`; without it the TLS listener is left out.

The default, anonymous mode has one plain listener and no identities: it cannot bind client
ids to usernames (Mosquitto refuses a client without a username under
`use_username_as_clientid`), so there any client may use any client id.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from devtools import broker_config
from devtools.broker_config import PLAIN, SETTINGS, TLS, Listen

REPO = Path(__file__).resolve().parents[1]
ACL = REPO / "mosquitto" / "acl"
MAKE_CERTS = REPO / "scripts" / "make_certs.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_config: str = "",
        anonymous: bool = True,
        *,
        identities: Mapping[str, str] | None = None,
        acl: Path | None = None,
        tls: bool = False,
        tls_clients: Iterable[str] = (),
        certs_dir: Path | None = None,
        tls_port: int | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        """`identities` (username -> password) turns on secured mode: password file and ACL
        (`acl`, default the repository's `mosquitto/acl`). `tls` adds a TLS listener on
        `tls_port` (default: another free port) that requires a client certificate signed by
        the lab CA in `certs_dir` (default `workdir/certs`); `tls_clients` get certificates.
        `settings` changes values of tilebridge.conf (each must be set there already)."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (make system installs it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.anonymous = anonymous
        self.identities = dict(identities) if identities is not None else None
        self.acl_source = acl or ACL
        self.tls = tls
        self.tls_clients = list(tls_clients)
        self.certs_dir = Path(certs_dir) if certs_dir else self.workdir / "certs"
        self.tls_port = (tls_port or free_port()) if tls else None
        self.settings = dict(settings or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def secured(
        cls,
        workdir: Path,
        identities: Mapping[str, str],
        *,
        port: int | None = None,
        extra_config: str = "",
        acl: Path | None = None,
        tls: bool = False,
        tls_clients: Iterable[str] = (),
        certs_dir: Path | None = None,
        tls_port: int | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> Mosquitto:
        """Production's listeners and authentication, the repository's ACL."""
        return cls(
            workdir, port, extra_config, anonymous=False, identities=identities, acl=acl,
            tls=tls, tls_clients=tls_clients, certs_dir=certs_dir, tls_port=tls_port,
            settings=settings,
        )  # fmt: skip

    @property
    def secure(self) -> bool:
        return self.identities is not None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def password_path(self) -> Path:
        return self.workdir / "passwd"

    @property
    def acl_path(self) -> Path:
        return self.workdir / "acl"

    @property
    def ca_file(self) -> Path:
        return self.certs_dir / "ca.crt"

    def client_cert(self, name: str) -> tuple[Path, Path]:
        """(certificate, private key) of a TLS client made by `scripts/make_certs.sh`."""
        return (
            self.certs_dir / "devices" / f"{name}.crt",
            self.certs_dir / "devices" / f"{name}.key",
        )

    def write_config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        lines = [
            f"# generated by devtools/broker.py; settings from {SETTINGS.name}",
            # Run as whoever runs the tests: as root, Mosquitto would otherwise switch to the
            # `mosquitto` user and could not write its log, its persistence file or read keys.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"persistence_location {data}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            self.extra_config,
        ]
        if self.secure:
            self._write_security_files()
            if self.tls:
                self.issue_certs(self.tls_clients)
            lines.append(self._production_listeners())
        else:
            lines += [
                f"listener {self.port} {self.host}",
                f"allow_anonymous {'true' if self.anonymous else 'false'}",
            ]
        lines.append(broker_config.with_values(SETTINGS.read_text(), self.settings))
        text = "\n".join(lines) + "\n"
        self.config_path.write_text(text)
        return self.config_path

    def _production_listeners(self) -> str:
        files = {
            "passwd": self.password_path,
            "acl": self.acl_path,
            "ca.crt": self.ca_file,
            "server.crt": self.certs_dir / "server.crt",
            "server.key": self.certs_dir / "server.key",
        }
        tls = Listen(self.tls_port, self.host) if self.tls_port is not None else None
        return broker_config.render(
            broker_config.SOURCE.read_text(),
            paths=broker_config.by_name(files),
            listeners={PLAIN: Listen(self.port, self.host), TLS: tls},
        )

    def _write_security_files(self) -> None:
        assert self.identities is not None
        if not self.password_path.exists():
            self.password_path.touch(mode=0o600)
            for name, password in self.identities.items():
                self._passwd("-b", str(self.password_path), name, password)
        acl = self.acl_source.read_text()
        from server_ingest.identities import Role, acl_add_user, role_of

        for name in self.identities:
            if role_of(name) is not Role.DEVICE and name not in ("ingest", "monitor"):
                acl = acl_add_user(acl, name, role_of(name))  # as `device add --role` does
        self.acl_path.write_text(acl)

    @staticmethod
    def _passwd(*args: str) -> None:
        # Test passwords only: `-b` puts the password on a command line.
        subprocess.run(["mosquitto_passwd", *args], check=True, capture_output=True)

    def issue_certs(self, clients: Iterable[str] = ()) -> None:
        """Lab CA, server certificate (localhost, 127.0.0.1) and client certificates."""
        subprocess.run(
            ["bash", str(MAKE_CERTS), "-o", str(self.certs_dir), *clients],
            check=True,
            capture_output=True,
        )

    # -- identities at run time -------------------------------------------------------------

    def add_identity(self, name: str, password: str) -> None:
        """Create or change an identity, then reload (SIGHUP)."""
        assert self.identities is not None, "not a secured broker"
        self._passwd("-b", str(self.password_path), name, password)
        self.identities[name] = password
        self.reload()

    def remove_identity(self, name: str) -> None:
        """Revoke an identity, then reload: Mosquitto disconnects its clients."""
        assert self.identities is not None, "not a secured broker"
        self._passwd("-D", str(self.password_path), name)
        self.identities.pop(name, None)
        self.reload()

    def reload(self, timeout: float = 10) -> None:
        """SIGHUP: Mosquitto re-reads the password and ACL files; wait until it has."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        before = self._reloads()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not reload: {self.log_tail()}")
            time.sleep(0.02)

    def _reloads(self) -> int:
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("Reloading config.")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Mosquitto:
        self.write_config()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err} {self.log_tail()}")
            if all(self._listening(p) for p in ports):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {ports}: {self.log_tail()}")

    def _listening(self, port: int | None) -> bool:
        assert port is not None
        try:
            with socket.create_connection((self.host, port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Graceful stop: Mosquitto saves its persistence file."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_stderr()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_stderr()
        self.proc = None

    def _close_stderr(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

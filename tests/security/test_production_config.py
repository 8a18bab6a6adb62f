"""The shipped `mosquitto/mosquitto.conf` itself, started by the real Mosquitto with only its
paths and ports moved into a temporary directory (devtools/broker_config.py: the one
rendering that the tests' secured brokers and the compose file use too)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import broker_config
from devtools.broker import ACL, MAKE_CERTS, free_port
from devtools.broker_config import PLAIN, SETTINGS, TLS, Listen
from server_ingest import identities
from tests.security.conftest import Probe, Tls, wait_until

PASSWORDS = {"scope-a": identities.new_password(), "ingest": identities.new_password()}


class Production:
    def __init__(self, root: Path) -> None:
        self.etc = root / "etc"
        self.certs = root / "certs"
        self.plain, self.tls = free_port(), free_port()
        self.log = root / "mosquitto.log"
        self.probes: list[Probe] = []

    def probe(self, user: str | None, port: int, tls: Tls | None = None, **kw: str) -> Probe:
        probe = Probe(port, user, kw.get("password", PASSWORDS.get(user or "")), tls)
        self.probes.append(probe)
        return probe

    def device_tls(self, with_cert: bool = True) -> Tls:
        devices = self.certs / "devices"
        if not with_cert:
            return Tls(self.etc / "ca.crt")
        return Tls(self.etc / "ca.crt", devices / "scope-a.crt", devices / "scope-a.key")


@pytest.fixture
def production(tmp_path: Path) -> Iterator[Production]:
    env = Production(tmp_path)
    subprocess.run(["bash", str(MAKE_CERTS), "-o", str(env.certs), "scope-a"], check=True,
                   capture_output=True)  # fmt: skip
    env.etc.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(env.certs / name, env.etc / name)
    shutil.copy(ACL, env.etc / "acl")
    for name, password in PASSWORDS.items():
        identities.set_identity(env.etc / "passwd", name, password)
    source = broker_config.SOURCE.read_text()
    assert "listener 1883 127.0.0.1\n" in source and "listener 8883\n" in source
    listeners = broker_config.render(
        source,
        paths=broker_config.under(str(env.etc)),
        listeners={PLAIN: Listen(env.plain, "127.0.0.1"), TLS: Listen(env.tls, "127.0.0.1")},
    )
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\npersistence_location {tmp_path}/\n"
        f"log_dest file {env.log}\n{SETTINGS.read_text()}\n{listeners}"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(config)], stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip

    def listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        ready = wait_until(lambda: proc.poll() is not None or (
            listening(env.plain) and listening(env.tls)))  # fmt: skip
        assert ready and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield env
    finally:
        for probe in env.probes:
            probe.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def test_the_production_listeners_require_passwords_and_device_certificates(
    production: Production,
) -> None:
    p = production
    assert p.probe("ingest", p.plain).connect() == "Success"
    assert p.probe(None, p.plain).connect() == "Not authorized"
    assert p.probe("ingest", p.plain, password="wrong").connect() == "Not authorized"
    assert p.probe("scope-a", p.tls, p.device_tls()).connect() == "Success"
    assert p.probe("scope-a", p.tls, p.device_tls(with_cert=False)).connect() != "Success"
    assert p.probe("scope-a", p.tls, p.device_tls(), password="wrong").connect() == "Not authorized"
    assert p.probe("scope-a", p.tls).connect() != "Success"  # plain MQTT on the TLS port
    log = p.log.read_text()
    assert " running" in log and ": Error: " not in log  # the shipped file loads cleanly
    assert "peer did not return a certificate" in log  # refused in the TLS handshake

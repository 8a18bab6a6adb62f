"""The compose broker enforces exactly what production enforces: one source of policy.

`deploy/compose/mosquitto.conf` must be the rendering of `mosquitto/mosquitto.conf` by
devtools/broker_config.py (file locations and listen addresses moved, nothing else), and
that file, laid out as deploy/compose.yaml mounts it into the container, must refuse on the
installed Mosquitto what production refuses.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import broker_config
from devtools.broker import ACL, MAKE_CERTS, free_port
from devtools.broker_config import PATH_OPTIONS, PLAIN, TLS, Listen, options, sections
from devtools.stack import wait_for
from server_ingest.__main__ import main
from tests.security.conftest import Probe, Tls

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_CONF = DEPLOY / "compose" / "mosquitto.conf"
REGENERATE = "python -m devtools.broker_config compose > deploy/compose/mosquitto.conf"
SITE_OPTIONS = PATH_OPTIONS | {"listener", "log_dest"}


def mosquitto_service() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"][
        "mosquitto"
    ]
    return service


def policy(text: str) -> dict[int | None, set[tuple[str, str]]]:
    """What a config enforces, by listener: every line but where files are and who listens."""
    return {
        port: {(o, v) for o, v in lines if o not in SITE_OPTIONS}
        for port, lines in sections(text).items()
    }


def test_the_compose_config_is_generated_from_the_production_one() -> None:
    assert COMPOSE_CONF.read_text() == broker_config.compose(), f"regenerate: {REGENERATE}"


def test_compose_and_production_enforce_the_same_lines() -> None:
    """Independent of the renderer: the same policy lines on the same listeners."""
    production, compose = broker_config.SOURCE.read_text(), COMPOSE_CONF.read_text()
    assert policy(compose) == policy(production)
    assert [v for o, v in options(compose) if o == "listener"] == ["1883", "8883"]


def test_the_source_binds_client_ids_on_every_listener_and_tls_needs_a_certificate() -> None:
    parts = sections(broker_config.SOURCE.read_text())
    assert {("per_listener_settings", "false"), ("allow_anonymous", "false")} <= set(parts[None])
    assert set(parts) == {None, PLAIN, TLS}
    for port in (PLAIN, TLS):
        assert ("use_username_as_clientid", "true") in parts[port], port
    tls = dict(parts[TLS])
    assert tls["require_certificate"] == "true" and tls["use_identity_as_username"] == "false"
    assert "cafile" not in dict(parts[PLAIN])  # plain TCP: loopback only
    assert parts[PLAIN][0] == ("listener", "1883 127.0.0.1")


def test_compose_publishes_only_the_tls_listener() -> None:
    assert mosquitto_service()["ports"] == ["8883:8883"]


class ComposeBroker:
    """The compose broker's container filesystem under `root`, as compose.yaml mounts it, with
    the broker's files made by the commands of docs/deploy.md, section 5."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plain, self.tls = free_port(), free_port()
        self.log = root / "mosquitto.log"
        self.ca = root / "deploy" / "compose" / "ca"
        self.device_dir = root / "deploy" / "compose" / "secrets" / "scope-a"
        self.passwords: dict[str, str] = {}
        self.probes: list[Probe] = []

    def container(self, path: str) -> Path:
        return self.root / "container" / path.lstrip("/")

    def lay_out(self) -> Path:
        """Every mount of the mosquitto service; returns the main config file."""
        for volume in mosquitto_service()["volumes"]:
            source, target = volume.split(":")[:2]
            into = self.container(target)
            if source == "./compose/broker":
                self.broker_files(into)
            elif source.startswith("."):
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(DEPLOY / source, into)
            else:
                into.mkdir(parents=True)  # a named volume
        return self.container("/mosquitto/config/mosquitto.conf")

    def broker_files(self, broker: Path) -> None:
        """Steps 2 and 3, with the host name the test reaches the broker by."""
        subprocess.run(["bash", str(MAKE_CERTS), "-o", str(self.ca), "-s", "127.0.0.1"],
                       check=True, capture_output=True)  # fmt: skip
        broker.mkdir(parents=True)
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copy(self.ca / name, broker / name)
        shutil.copy(ACL, broker / "acl")
        common = ["--password-file", str(broker / "passwd"), "--acl", str(broker / "acl"),
                  "--certs-dir", str(self.ca), "--pid-file", str(self.root / "no.pid")]  # fmt: skip
        secrets = self.device_dir.parent
        for name, extra in (
            ("ingest", ["--role", "ingest", "--out", str(secrets / "ingest")]),
            ("monitor", ["--role", "monitor", "--out", str(secrets / "monitor")]),
            ("scope-a", ["--host", "127.0.0.1", "--out", str(secrets / "scope-a")]),
        ):
            assert main(["device", "add", name, *common, *extra, "--hide-password"]) == 0
            self.passwords[name] = (secrets / name / "mqtt-password").read_text().strip()

    def config(self, mounted: Path) -> Path:
        """The mounted main config with container paths under `root` and free ports."""
        text = broker_config.render(
            mounted.read_text(),
            paths=lambda value: str(self.container(value)) + ("/" if value.endswith("/") else ""),
            listeners={PLAIN: Listen(self.plain, "127.0.0.1"), TLS: Listen(self.tls, "127.0.0.1")},
            header=[f"user {pwd.getpwuid(os.geteuid()).pw_name}", f"log_dest file {self.log}"],
        )
        path = self.root / "run.conf"
        path.write_text(text)
        return path

    def probe(self, user: str | None, port: int, tls: Tls | None = None, **kw: Any) -> Probe:
        password = kw.pop("password", self.passwords.get(user or ""))
        probe = Probe(port, user, password, tls, **kw)
        self.probes.append(probe)
        return probe

    def device_tls(self, cert: bool = True) -> Tls:
        """What `device add scope-a` put in the directory for the Pi."""
        ca = self.device_dir / "ca.crt"
        if not cert:
            return Tls(ca)
        return Tls(ca, self.device_dir / "scope-a.crt", self.device_dir / "scope-a.key")


@pytest.fixture
def compose_broker(tmp_path: Path) -> Iterator[ComposeBroker]:
    env = ComposeBroker(tmp_path)
    config = env.config(env.lay_out())
    proc = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or " running" in _text(env.log), 10, "mosquitto")
        assert proc.poll() is None, _text(env.log)
        yield env
    finally:
        for probe in env.probes:
            probe.close()
        proc.terminate()
        proc.wait(timeout=10)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_the_compose_broker_refuses_what_production_refuses(compose_broker: ComposeBroker) -> None:
    b = compose_broker
    assert b.probe(None, b.plain).connect() == "Not authorized"
    assert b.probe("ingest", b.plain, password="wrong").connect() == "Not authorized"
    ingest = b.probe("ingest", b.plain, client_id="tb-ingest-ingest-1", session_expiry=600)
    assert ingest.connect() == "Success"
    assert b.probe("scope-a", b.tls, b.device_tls()).connect() == "Success"
    assert b.probe("scope-a", b.tls, b.device_tls(cert=False)).connect() != "Success"
    assert b.probe("scope-a", b.tls).connect() != "Success"  # plain MQTT on the TLS port
    # The ingest's client id, asked for by another identity, is not the ingest's session.
    for port, tls in ((b.plain, None), (b.tls, b.device_tls())):
        for wanted in ("tb-ingest-ingest-1", "ingest"):
            user = "monitor" if tls is None else "scope-a"
            assert b.probe(user, port, tls, client_id=wanted).connect() == "Success"
    log = _text(b.log)
    assert not ingest.disconnected.is_set(), log
    assert "as ingest (" in log and "as tb-ingest-ingest-1" not in log
    assert "peer did not return a certificate" in log and ": Error: " not in log

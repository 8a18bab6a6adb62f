"""Why the TLS listener keeps `use_identity_as_username false` (docs/security.md, "TLS").

Binding the certificate to the identity is what `use_identity_as_username true` would do. On
the installed Mosquitto, with the production listeners otherwise unchanged: the password file
is then not used on that listener, so a certificate alone is an identity (one the CA signed
with CN=ingest reads every device's uploads, no password asked); and revoking a certificate
takes a CRL, which SIGHUP does reload, but which leaves the revoked device's open connection
running and publishing (removing a password cuts it: tests/security/test_admin.py). Should a
Mosquitto upgrade change either, these tests fail and the decision is worth taking again.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import broker_config
from devtools.broker import ACL, MAKE_CERTS, free_port
from devtools.broker_config import PLAIN, TLS, Listen
from devtools.stack import wait_for
from tests.security.conftest import Probe, Tls, wait_until
from tilebridge_protocol.topics import DeviceTopic, device_filter, device_topic

CN_AS_USERNAME = "use_identity_as_username true"


class CertificateIdentity:
    """Production's listeners with `use_identity_as_username true`, and a CRL."""

    def __init__(self, root: Path) -> None:
        self.root, self.certs = root, root / "certs"
        self.plain, self.tls = free_port(), free_port()
        self.log = root / "mosquitto.log"
        self.crl = root / "crl.pem"
        self.proc: subprocess.Popen[bytes] | None = None
        self.probes: list[Probe] = []

    def prepare(self) -> Path:
        subprocess.run(["bash", str(MAKE_CERTS), "-o", str(self.certs), "scope-a", "ingest"],
                       check=True, capture_output=True)  # fmt: skip
        (self.root / "passwd").touch()  # nobody has a password
        shutil.copy(ACL, self.root / "acl")
        self.openssl_ca("-gencrl", "-out", str(self.crl))
        source = broker_config.SOURCE.read_text()
        assert "use_identity_as_username false" in source
        source = source.replace("use_identity_as_username false", CN_AS_USERNAME)
        files = {"passwd": self.root / "passwd", "acl": self.root / "acl"}
        files |= {name: self.certs / name for name in ("ca.crt", "server.crt", "server.key")}
        listeners = broker_config.render(
            source,
            paths=broker_config.by_name(files),
            listeners={PLAIN: Listen(self.plain, "127.0.0.1"), TLS: Listen(self.tls, "127.0.0.1")},
        )
        config = self.root / "mosquitto.conf"
        config.write_text(
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlog_dest file {self.log}\n"
            f"{listeners}crlfile {self.crl}\n"  # the last listener's: the TLS one
        )
        return config

    def openssl_ca(self, *args: str) -> None:
        """`openssl ca` with a minimal database next to the lab CA made by make_certs.sh."""
        db = self.root / "ca-db"
        if not db.exists():
            db.mkdir()
            (db / "index.txt").touch()
            (db / "crlnumber").write_text("1000\n")
            (db / "ca.cnf").write_text(
                f"[ca]\ndefault_ca = lab\n[lab]\ndatabase = {db}/index.txt\n"
                f"crlnumber = {db}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n"
            )
        subprocess.run(
            ["openssl", "ca", "-config", str(db / "ca.cnf"), "-keyfile", str(self.certs / "ca.key"),
             "-cert", str(self.certs / "ca.crt"), *args],
            check=True, capture_output=True,
        )  # fmt: skip

    def device(self, name: str) -> Tls:
        devices = self.certs / "devices"
        return Tls(self.certs / "ca.crt", devices / f"{name}.crt", devices / f"{name}.key")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def probe(self, name: str) -> Probe:
        probe = Probe(self.tls, tls=self.device(name))
        self.probes.append(probe)
        return probe


@pytest.fixture
def cert_identity(tmp_path: Path) -> Iterator[CertificateIdentity]:
    env = CertificateIdentity(tmp_path)
    proc = subprocess.Popen(["mosquitto", "-c", str(env.prepare())], stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    env.proc = proc
    try:
        wait_for(lambda: " running" in env.log_text() or proc.poll() is not None, 10, "mosquitto")
        assert proc.poll() is None, env.log_text()
        yield env
    finally:
        for probe in env.probes:
            probe.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_with_the_certificate_as_identity_no_password_is_checked(
    cert_identity: CertificateIdentity,
) -> None:
    ingest = cert_identity.probe("ingest")  # a certificate with CN=ingest, no password at all
    assert ingest.connect() == "Success"
    ingest.subscribe(device_filter(DeviceTopic.CHUNK))
    device = cert_identity.probe("scope-a")
    assert device.connect() == "Success"  # and not in the password file either
    assert device.publish(device_topic("scope-a", DeviceTopic.CHUNK), b"tile") == "Success"
    assert ingest.wait_for(device_topic("scope-a", DeviceTopic.CHUNK), b"tile")


def test_a_revoked_certificate_keeps_its_open_connection(
    cert_identity: CertificateIdentity,
) -> None:
    env = cert_identity
    assert env.proc is not None
    live, reader = env.probe("scope-a"), env.probe("ingest")
    assert live.connect() == "Success" and reader.connect() == "Success"
    reader.subscribe(device_filter(DeviceTopic.CHUNK))
    cert = env.device("scope-a").cert
    assert cert is not None
    env.openssl_ca("-revoke", str(cert))
    env.openssl_ca("-gencrl", "-out", str(env.crl))
    before = env.log_text().count("Reloading config.")
    env.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: env.log_text().count("Reloading config.") > before)
    assert env.probe("scope-a").connect() != "Success"  # the reloaded CRL refuses it...
    assert "certificate verify failed" in env.log_text()
    topic = device_topic("scope-a", DeviceTopic.CHUNK)
    assert live.publish(topic, b"after revocation") == "Success"  # ...but not its session
    assert reader.wait_for(topic, b"after revocation")
    assert not live.disconnected.is_set()

"""`server-ingest device add|remove|list` and `scripts/make_certs.sh`, against a real
Mosquitto: what the admin command writes is what the broker accepts."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.broker import ACL, MAKE_CERTS
from edge_agent.settings import AgentSettings
from server_ingest import admin, identities
from server_ingest.__main__ import main
from tests.security.conftest import SecuredBroker, Tls, start_secured, wait_until
from tilebridge_protocol.topics import UPSTREAM, DeviceTopic, device_filter, device_topic
from tilebridge_runtime.mqtt import BrokerSettings, MqttConnection


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredBroker]:
    """A broker of its own: these tests change its password file and ACL."""
    env = start_secured(tmp_path / "broker", ("ingest", "monitor", "scope-a"))
    try:
        yield env
    finally:
        env.close_probes()
        env.broker.stop()


def device(secured: SecuredBroker, action: str, *args: str) -> int:
    """`server-ingest device <action> ...` for this test's broker."""
    b = secured.broker
    assert b.proc is not None
    return main(
        ["device", action, "--password-file", str(b.password_path), "--acl", str(b.acl_path),
         "--certs-dir", str(b.certs_dir), "--pid", str(b.proc.pid), *args]
    )  # fmt: skip


def reloads(secured: SecuredBroker) -> int:
    return secured.broker.log_path.read_text().count("Reloading config.")


def wait_reloaded(secured: SecuredBroker, before: int) -> None:
    assert wait_until(lambda: reloads(secured) > before), secured.broker.log_tail()


# -- password hashes ----------------------------------------------------------------------------


def test_hashes_use_mosquittos_format_and_verify_its_own(tmp_path: Path) -> None:
    encoded = identities.hash_password("s3cret")
    assert encoded.startswith(f"$7${identities.PBKDF2_ITERATIONS}$")
    assert identities.verify_password("s3cret", encoded)
    assert not identities.verify_password("S3cret", encoded)
    assert identities.hash_password("s3cret") != encoded  # salted
    # ...and mosquitto_passwd's hashes verify with the same code: one format.
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), "someone", "pw"], check=True)
    assert identities.verify_password("pw", identities.read_password_file(path)["someone"])


def test_an_identity_written_by_admin_is_accepted_by_mosquitto(secured: SecuredBroker) -> None:
    password = identities.new_password()
    assert len(password) >= 40
    assert not identities.set_identity(secured.broker.password_path, "scope-new", password)
    secured.broker.reload()
    assert secured.probe("scope-new", password).connect() == "Success"
    assert secured.probe("scope-new", password[:-1]).connect() == "Not authorized"
    # the other identities are untouched
    assert secured.probe("scope-a").connect() == "Success"


# -- the CLI ------------------------------------------------------------------------------------


def test_device_add_prints_a_working_edge_config_and_the_password_once(
    secured: SecuredBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scope-c"
    b = secured.broker
    before = reloads(secured)
    code = device(
        secured, "add", "scope-c", "--out", str(out), "--edge-dir", str(out),
        "--host", "127.0.0.1", "--port", str(b.tls_port), "--cert",
    )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    password = (out / admin.PASSWORD_FILE_NAME).read_text().strip()
    assert stat.S_IMODE((out / admin.PASSWORD_FILE_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "scope-c.key").stat().st_mode) == 0o600
    assert password not in captured.out  # stdout is the config: safe to redirect to a file
    assert captured.err.count(password) == 1
    assert "NEW MQTT PASSWORD for scope-c" in captured.err
    snippet = json.loads(captured.out)
    assert snippet == json.loads((out / "config.json").read_text())
    assert password not in (out / "config.json").read_text()
    settings = AgentSettings.model_validate({**snippet, "spool_dir": str(tmp_path / "spool")})
    assert settings.device_id == "scope-c" and settings.broker.username == "scope-c"
    assert settings.broker.tls and settings.broker.cert_file == out / "scope-c.crt"
    wait_reloaded(secured, before)  # --pid: the broker was told to reload

    # The printed configuration connects, over TLS with the new client certificate.
    connection = MqttConnection(settings.broker, "tb-edge-scope-c", "edge-mqtt", lambda c: None,
                                lambda m: None)  # fmt: skip
    connection.start()
    try:
        assert connection.connected.wait(10), connection.last_error
    finally:
        connection.stop()
    subject = subprocess.run(
        ["openssl", "x509", "-in", str(out / "scope-c.crt"), "-noout", "-subject"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "CN = scope-c" in subject


def test_device_add_again_rotates_the_password(
    secured: SecuredBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "id"
    assert device(secured, "add", "scope-r", "--out", str(out), "--no-tls") == 0
    first = (out / admin.PASSWORD_FILE_NAME).read_text().strip()
    assert wait_until(lambda: secured.probe("scope-r", first).connect() == "Success")
    old = secured.connected("scope-r", password=first)
    before = reloads(secured)
    assert device(secured, "add", "scope-r", "--out", str(out), "--no-tls", "--hide-password") == 0
    err = capsys.readouterr().err
    assert "rotated device identity 'scope-r'" in err
    second = (out / admin.PASSWORD_FILE_NAME).read_text().strip()
    assert second != first and second not in err
    wait_reloaded(secured, before)
    assert secured.probe("scope-r", first).connect() == "Not authorized"
    assert secured.probe("scope-r", second).connect() == "Success"
    assert old.disconnected.wait(10)  # a session on the old password is cut


def test_device_remove_revokes_and_disconnects(
    secured: SecuredBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    connected = secured.connected("scope-a")
    before = reloads(secured)
    assert device(secured, "remove", "scope-a") == 0
    assert "sent SIGHUP" in capsys.readouterr().err
    wait_reloaded(secured, before)
    assert connected.disconnected.wait(10)
    assert secured.probe("scope-a").connect() == "Not authorized"
    assert "scope-a" not in identities.read_password_file(secured.broker.password_path)
    assert device(secured, "remove", "scope-a") == 1  # nothing left to remove


def test_device_remove_revokes_a_tls_device_whose_certificate_stays_valid(
    secured: SecuredBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """The certificate only admits "a device of this lab" (use_identity_as_username false):
    removing the identity is the revocation, no CRL needed, and it cuts the live session."""
    tls = secured.tls("scope-a")
    connected = secured.connected("scope-a", tls=tls)
    before = reloads(secured)
    assert device(secured, "remove", "scope-a") == 0
    err = capsys.readouterr().err
    assert "stays valid for TLS, but the broker also requires the password" in err
    wait_reloaded(secured, before)
    assert connected.disconnected.wait(10)
    assert secured.probe("scope-a", tls=tls).connect() == "Not authorized"
    assert tls.cert is not None
    # ...although it is still a valid certificate of the lab CA
    subprocess.run(["openssl", "verify", "-CAfile", str(tls.ca), str(tls.cert)], check=True,
                   capture_output=True)  # fmt: skip


def test_device_remove_without_a_pid_says_how_to_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "passwd"
    identities.set_identity(path, "scope-x", "pw")
    code = main(["device", "remove", "scope-x", "--password-file", str(path), "--acl",
                 str(tmp_path / "acl"), "--pid-file", str(tmp_path / "none.pid")])  # fmt: skip
    assert code == 0
    assert "SIGHUP" in capsys.readouterr().err
    assert identities.read_password_file(path) == {}


def test_device_list(secured: SecuredBroker, capsys: pytest.CaptureFixture[str]) -> None:
    assert device(secured, "list") == 0
    lines = {tuple(line.split("\t")) for line in capsys.readouterr().out.splitlines()}
    assert lines == {
        ("ingest", "ingest", "-"),
        ("monitor", "monitor", "-"),
        ("scope-a", "device", "certificate"),
    }


LOOKALIKES = ["Ingest", "INGEST", "ingest.2", "ingest_2", "ingest2", "Ingest-2", "iNgEsT-x",
              "Monitor", "monitor_1", "monitor.1", "MONITOR-2", "monitor1"]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "monitor", "ingest", "ingest-3", "monitor-x", "-x", "a b", "x" * 64, "",
     *LOOKALIKES],
)  # fmt: skip
def test_bad_or_reserved_device_names_are_refused(
    secured: SecuredBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    before = secured.broker.password_path.read_text()
    assert device(secured, "add", "--out", str(tmp_path / "o"), "--", name) == 1
    assert "error:" in capsys.readouterr().err
    assert secured.broker.password_path.read_text() == before


@pytest.mark.parametrize("name", LOOKALIKES)
def test_lookalikes_of_service_identities_are_refused_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / "passwd"
    code = main(
        ["device", "add", name, "--password-file", str(path), "--acl", str(tmp_path / "acl"),
         "--no-tls", "--out", str(tmp_path / "o"), "--pid-file", str(tmp_path / "no.pid")]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    reserved = "ingest" if "ingest" in name.lower() else "monitor"
    assert f"error: {name!r} looks like the reserved {reserved} identity" in err
    assert not path.exists() and not (tmp_path / "o").exists()
    with pytest.raises(identities.AdminError, match="must be named"):
        identities.check_name(name, identities.Role(reserved))  # nor is it a service identity


@pytest.mark.parametrize(
    "name", ["scope-1", "monitoring-scope", "ingester", "scope-ingest", "Scope_1.b", "m0nitor"]
)
def test_device_ids_that_only_start_alike_are_accepted(name: str) -> None:
    assert identities.check_name(name) == name
    assert identities.lookalike_of(name) is None


def test_a_lookalike_made_before_they_were_refused_is_flagged_and_can_be_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "passwd"
    identities.set_identity(path, "Ingest", "pw")
    identities.set_identity(path, "scope-1", "pw")
    common = ["--password-file", str(path), "--acl", str(tmp_path / "acl"),
              "--pid-file", str(tmp_path / "none.pid")]  # fmt: skip
    assert main(["device", "list", *common]) == 0
    captured = capsys.readouterr()
    assert "Ingest\tdevice\t-" in captured.out
    assert "warning: device 'Ingest' looks like the ingest identity: remove it" in captured.err
    assert "scope-1" not in captured.err
    assert main(["device", "remove", "Ingest", *common]) == 0
    assert list(identities.read_password_file(path)) == ["scope-1"]


def test_an_extra_ingest_instance_gets_the_ingest_rights(
    secured: SecuredBroker, tmp_path: Path
) -> None:
    out = tmp_path / "ingest-9"
    before = reloads(secured)
    assert device(secured, "add", "ingest-9", "--role", "ingest", "--out", str(out)) == 0
    wait_reloaded(secured, before)
    acl = secured.broker.acl_path.read_text()
    assert "user ingest-9\n" in acl and "topic deny tilebridge/v1/dev/ingest-9/#" in acl
    config = json.loads((out / "config.json").read_text())["broker"]
    assert config["host"] == "127.0.0.1" and config["port"] == 1883 and not config["tls"]
    password = (out / admin.PASSWORD_FILE_NAME).read_text().strip()
    ingest = secured.connected("ingest-9", password=password)
    ingest.subscribe(*[device_filter(k) for k in UPSTREAM])
    a = secured.connected("scope-a")
    assert a.publish(device_topic("scope-a", DeviceTopic.OPEN), b"m") == "Success"
    assert ingest.wait_for(device_topic("scope-a", DeviceTopic.OPEN), b"m")

    before = reloads(secured)
    assert device(secured, "remove", "ingest-9") == 0
    wait_reloaded(secured, before)
    assert "ingest-9" not in secured.broker.acl_path.read_text()
    assert secured.broker.acl_path.read_text().count("user ingest\n") == 1  # template kept


def test_acl_blocks_are_copied_and_removed_cleanly() -> None:
    text = ACL.read_text()
    added = identities.acl_add_user(text, "monitor-2", identities.Role.MONITOR)
    assert added.startswith(text)
    block = added[len(text) :]
    assert "user monitor-2\n" in block
    assert "topic deny tilebridge/v1/dev/monitor-2/#" in block
    assert "write" not in block  # a copy of the read-only monitor block
    # idempotent
    assert identities.acl_add_user(added, "monitor-2", identities.Role.MONITOR) == added
    assert identities.acl_remove_user(added, "monitor-2").rstrip() == text.rstrip()
    assert identities.acl_remove_user(text, "monitor") == text  # the templates stay
    # the patterns cover a device
    assert identities.acl_add_user(text, "scope-a", identities.Role.DEVICE) == text


def test_password_file_keeps_its_mode_and_other_entries(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    identities.set_identity(path, "a", "1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # never world-readable
    path.chmod(0o600)
    identities.set_identity(path, "b", "2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = identities.read_password_file(path)
    assert list(entries) == ["a", "b"] and identities.verify_password("1", entries["a"])
    assert identities.remove_identity(path, "a") and not identities.remove_identity(path, "a")
    assert list(identities.read_password_file(path)) == ["b"]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["passwd"]


# -- make_certs.sh ------------------------------------------------------------------------------


def make_certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(MAKE_CERTS), *args], capture_output=True, text=True, check=False
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_make_certs_is_idempotent_and_keeps_keys_private(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert make_certs("-o", str(out), "scope-a").returncode == 0
    first = snapshot(out)
    assert make_certs("-o", str(out), "scope-a").returncode == 0
    assert snapshot(out) == first  # nothing re-issued
    for key in ["ca.key", "server.key", "devices/scope-a.key"]:
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.crt"),
         str(out / "server.crt"), str(out / "devices/scope-a.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text


def test_make_certs_adds_devices_rotates_and_follows_the_sans(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert make_certs("-o", str(out), "scope-a").returncode == 0
    first = snapshot(out)
    assert make_certs("-o", str(out), "scope-a", "scope-b").returncode == 0
    second = snapshot(out)
    assert second["devices/scope-a.key"] == first["devices/scope-a.key"]
    assert "devices/scope-b.crt" in second
    assert make_certs("-o", str(out), "-f", "scope-a").returncode == 0
    third = snapshot(out)
    assert third["devices/scope-a.key"] != second["devices/scope-a.key"]  # rotated
    assert third["devices/scope-b.key"] == second["devices/scope-b.key"]
    assert third["ca.key"] == first["ca.key"]
    assert make_certs("-o", str(out), "-s", "broker.lab", "-s", "10.0.0.5").returncode == 0
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:broker.lab" in text and "IP Address:10.0.0.5" in text
    assert snapshot(out)["server.key"] == first["server.key"]


@pytest.mark.parametrize("bad", [["../evil"], ["a/b"], ["-s", "bad name"], ["-d", "x"]])
def test_make_certs_refuses_bad_input(tmp_path: Path, bad: list[str]) -> None:
    result = make_certs("-o", str(tmp_path / "c"), *bad)
    assert result.returncode == 2
    assert not (tmp_path / "evil.key").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_make_certs_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(MAKE_CERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_a_rotated_client_certificate_still_connects(secured: SecuredBroker) -> None:
    b = secured.broker
    b.issue_certs([])  # idempotent: nothing changes
    assert make_certs("-o", str(b.certs_dir), "-f", "scope-a").returncode == 0
    cert, key = b.client_cert("scope-a")
    probe = secured.probe("scope-a", tls=Tls(b.ca_file, cert, key))
    assert probe.connect() == "Success"


def test_broker_settings_from_the_snippet_never_carry_the_password(tmp_path: Path) -> None:
    config = admin.edge_config("scope-q", "broker.lab", 8883, True, tmp_path, cert=True)
    settings = BrokerSettings.model_validate(config["broker"])
    assert settings.password is None and settings.password_file == tmp_path / "mqtt-password"


def test_a_tls_device_gets_a_certificate_by_default(
    secured: SecuredBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scope-d"
    assert device(secured, "add", "scope-d", "--out", str(out), "--edge-dir", "/etc/tb") == 0
    broker = json.loads(capsys.readouterr().out)["broker"]
    assert broker["tls"] and broker["port"] == 8883
    assert broker["cert_file"] == "/etc/tb/scope-d.crt" and broker["ca_file"] == "/etc/tb/ca.crt"
    assert {p.name for p in out.iterdir()} == {
        "config.json", "mqtt-password", "ca.crt", "scope-d.crt", "scope-d.key",
    }  # fmt: skip


def test_without_a_lab_ca_no_certificate_is_invented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the facility's own CA, `device add` must not quietly create a second one."""
    common = [
        "--password-file", str(tmp_path / "passwd"), "--acl", str(tmp_path / "acl"),
        "--certs-dir", str(tmp_path / "certs"), "--pid-file", str(tmp_path / "none.pid"),
    ]  # fmt: skip
    assert main(["device", "add", "scope-e", *common, "--out", str(tmp_path / "e")]) == 1
    assert "no lab CA" in capsys.readouterr().err
    assert not (tmp_path / "certs").exists() and not (tmp_path / "passwd").exists()
    (tmp_path / "ca.crt").write_text("the facility's CA\n")  # next to the password file
    out = tmp_path / "e"
    assert main(["device", "add", "scope-e", *common, "--out", str(out), "--no-cert"]) == 0
    broker = json.loads(capsys.readouterr().out)["broker"]
    assert broker["tls"] and "cert_file" not in broker
    assert (out / "ca.crt").read_text() == "the facility's CA\n"

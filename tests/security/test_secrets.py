"""Secrets never leave their files: not into logs, status messages, acks or config dumps.

A whole scan runs in-process through a secured Mosquitto (passwords from files of mode 600,
the device over TLS with a client certificate); then every log line, every status message
(retained ones included), every ack, the broker's log and the settings dumps are searched
for the passwords and the device's private key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from devtools.broker import ACL
from edge_agent.app import EdgeApp
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.identities import write_secret
from server_ingest.settings import IngestSettings
from tests.edge.stack import acquire
from tests.security.conftest import SecuredBroker, start_secured, wait_until
from tilebridge_protocol.topics import (
    DEVICE_STATUS_FILTER,
    IMAGE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
    DeviceTopic,
    device_topic,
)
from tilebridge_runtime.mqtt import BrokerSettings, MqttConnection
from tilebridge_runtime.secrets import (
    MASK,
    RedactingFilter,
    masked,
    masked_json,
    redact,
    secret_file_problem,
)

DEVICE = "scope-a"
STATUS_FILTERS = (DEVICE_STATUS_FILTER, INGEST_STATUS_FILTER, IMAGE_STATUS_FILTER)
# Only the device's own identity may read its acks, and one identity is one connection (the
# broker names every client after its username), so a probe logged in as the device would
# close the agent's connection. The acks are read by a test-only identity instead.
AUDIT_ACL = f"\nuser audit\ntopic read {device_topic(DEVICE, DeviceTopic.ACK)}\n"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredBroker]:
    acl = tmp_path / "acl-with-audit"
    acl.write_text(ACL.read_text() + AUDIT_ACL)
    env = start_secured(tmp_path / "broker", ("ingest", "monitor", "audit", DEVICE), acl=acl)
    try:
        yield env
    finally:
        env.close_probes()
        env.broker.stop()


def secret_strings(secured: SecuredBroker) -> list[str]:
    """The passwords, and each line of the device's private key."""
    _, key = secured.broker.client_cert(DEVICE)
    key_lines = [line for line in key.read_text().splitlines() if "PRIVATE KEY" not in line]
    assert key_lines
    return [*secured.passwords.values(), *key_lines]


def test_a_scan_through_a_secured_broker_leaks_no_secret(
    secured: SecuredBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    b = secured.broker
    secrets_dir = tmp_path / "secrets"
    for name in ("ingest", DEVICE):
        write_secret(secrets_dir / name, secured.passwords[name])
    cert, key = b.client_cert(DEVICE)
    assert b.tls_port is not None
    ingest_settings = IngestSettings(
        instance="ingest-1",
        broker=BrokerSettings(port=b.port, username="ingest", password_file=secrets_dir / "ingest"),
        data_dir=tmp_path / "ingest",
        status_interval_s=0.2,
    )
    agent_settings = AgentSettings(
        device_id=DEVICE,
        broker=BrokerSettings(
            host="127.0.0.1", port=b.tls_port, username=DEVICE,
            password_file=secrets_dir / DEVICE, tls=True, ca_file=b.ca_file,
            cert_file=cert, key_file=key,
        ),
        spool_dir=tmp_path / "spool",
        min_free_bytes=0,
        status_interval_s=0.2,
    )  # fmt: skip
    monitor = secured.connected("monitor")
    monitor.subscribe(*STATUS_FILTERS)
    acks = secured.connected("audit")
    acks.subscribe(device_topic(DEVICE, DeviceTopic.ACK))

    scan = SyntheticScan(columns=2, rows=2, tile_size=64, channels=2)
    manifest = scan.manifest()
    dumps: list[str] = []
    with IngestService(ingest_settings) as ingest, EdgeApp(agent_settings) as agent:
        acquire(agent, manifest, scan.frame)
        result = agent.acquisition.wait_done(manifest.image_id, 60)
        assert result.server == "complete", agent.status()
        image_topic = f"tilebridge/v1/image/{DEVICE}/{manifest.image_id}/status"
        assert wait_until(lambda: any(b'"complete"' in p for _, p in monitor.received(image_topic)))
        assert monitor.wait_for(device_topic(DEVICE, DeviceTopic.STATUS))
        assert monitor.wait_for("tilebridge/v1/ingest/ingest-1/status")
        dumps += [
            masked_json(ingest_settings), masked_json(agent_settings),
            repr(ingest_settings), str(agent_settings), repr(agent_settings.broker),
            ingest.status().model_dump_json(), agent.status().model_dump_json(),
        ]  # fmt: skip

    late = secured.connected("monitor")  # what the broker keeps: every retained status
    late.subscribe(*STATUS_FILTERS)
    assert late.wait_for(image_topic) and late.wait_for(device_topic(DEVICE, DeviceTopic.STATUS))

    tile_acks = [p for _, p in acks.received() if b'"kind":"tile"' in p]
    assert len(tile_acks) >= manifest.tile_count
    assert any(b'"kind":"image"' in p for _, p in acks.received())
    logs = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )  # fmt: skip
    assert "connected to" in logs  # the capture did see the services' logs
    texts = {
        "logs": logs,
        "broker log": b.log_path.read_text(errors="replace"),
        "status messages": "\n".join(
            p.decode(errors="replace") for _, p in monitor.received() + late.received()
        ),
        "acks": "\n".join(p.decode(errors="replace") for _, p in acks.received()),
        "dumps": "\n".join(dumps),
    }
    for secret in secret_strings(secured):
        for where, text in texts.items():
            assert secret not in text, f"a secret appears in the {where}"
    for name in ("ingest", DEVICE):
        assert str(secrets_dir / name) in texts["dumps"]  # the path is shown, not the content


def test_a_refused_password_is_not_logged(
    secured: SecuredBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password-" + secured.passwords[DEVICE][:8]
    write_secret(tmp_path / "pw", wrong)
    settings = BrokerSettings(
        port=secured.broker.port, username=DEVICE, password_file=tmp_path / "pw"
    )
    connection = MqttConnection(
        settings, "tb-edge-wrong", "edge-mqtt", lambda c: None, lambda m: None
    )
    connection.start()
    try:
        assert wait_until(lambda: "refused connection: Not authorized" in caplog.text)
    finally:
        connection.stop()
    assert wrong not in caplog.text and wrong not in (connection.last_error or "")


# -- the helpers -------------------------------------------------------------------------------


class _Nested(BaseModel):
    password: SecretStr | None = None
    token: str | None = None
    password_file: Path | None = None
    api_key: str = ""


class _Settings(BaseModel):
    broker: BrokerSettings
    omero_password: str
    nested: list[_Nested]
    host: str = "omero.lab"


def test_masked_dumps_hide_every_secret_but_keep_paths() -> None:
    settings = _Settings(
        broker=BrokerSettings(username="u", password=SecretStr("broker-secret")),
        omero_password="omero-secret",
        nested=[_Nested(password=SecretStr("nested-secret"), token="tok-secret",
                        password_file=Path("/etc/pw"), api_key="key-secret")],
    )  # fmt: skip
    text = masked_json(settings)
    for secret in ("broker-secret", "omero-secret", "nested-secret", "tok-secret", "key-secret"):
        assert secret not in text
    data = masked(settings)
    assert data["broker"]["password"] == MASK and data["omero_password"] == MASK
    assert data["nested"][0]["password_file"] == "/etc/pw" and data["host"] == "omero.lab"
    assert data["broker"]["username"] == "u"
    json.dumps(data)  # JSON-compatible


def test_omero_settings_dump_masked() -> None:
    from tilebridge_storage.omero_backend.settings import DevicePolicy, OmeroSettings

    settings = OmeroSettings(
        host="omero.lab", username="ingest", password=SecretStr("omero-pw-1"),
        devices={"scope-a": DevicePolicy(username="scope-a-omero",
                                         password=SecretStr("omero-pw-2"))},
    )  # fmt: skip
    text = masked_json(settings) + repr(settings)
    assert "omero-pw-1" not in text and "omero-pw-2" not in text


def test_redacting_filter_masks_known_secrets(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.security.redact")
    redactor = RedactingFilter(["hunter2-secret", "ab"])  # too short to mask safely: ignored
    logger.addFilter(redactor)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("login with %s failed (ab)", "hunter2-secret")
    finally:
        logger.removeFilter(redactor)
    assert "hunter2-secret" not in caplog.text
    assert f"login with {MASK} failed (ab)" in caplog.text
    assert redact("a hunter2-secret b", ["hunter2-secret"]) == f"a {MASK} b"


def test_secret_file_problem(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    write_secret(path, "x")
    assert secret_file_problem(path) is None
    os.chmod(path, 0o644)
    problem = secret_file_problem(path)
    assert problem is not None and "600" in problem
    assert secret_file_problem(tmp_path) is not None  # not a regular file

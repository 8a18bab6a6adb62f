"""The broker's authentication and ACL, checked against a real Mosquitto running the
repository's `mosquitto/acl`.

"Never arrives" is shown without sleeping: the forbidden publish is acknowledged first
(Mosquitto routes a message before it sends the PUBACK), then a permitted sentinel follows on
a topic the same subscriber reads. Mosquitto delivers to one subscriber in order, so once the
sentinel is there, the forbidden message would have been too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from uuid import UUID

import pytest

from devtools.broker import MAKE_CERTS
from tests.security.conftest import SecuredBroker, Tls
from tilebridge_protocol.topics import (
    DEVICE_STATUS_FILTER,
    IMAGE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
    UPSTREAM,
    DeviceTopic,
    device_filter,
    device_topic,
    image_status_topic,
    ingest_status_topic,
)

A, B = "scope-a", "scope-b"
DENIED = "Not authorized"
ACCEPTED = ("Success", "No matching subscribers")
UPSTREAM_FILTERS = [device_filter(kind) for kind in UPSTREAM]
IMAGE = UUID("00000000-0000-4000-8000-000000000001")


def topic(device: str, kind: DeviceTopic) -> str:
    return device_topic(device, kind)


# -- authentication -----------------------------------------------------------------------------


def test_every_identity_connects_with_its_own_password(probes: SecuredBroker) -> None:
    for user in probes.passwords:
        assert probes.probe(user).connect() == "Success"


def test_anonymous_clients_are_refused(probes: SecuredBroker) -> None:
    assert probes.probe(None).connect() == DENIED
    # Even with a valid client certificate, TLS does not replace the password.
    assert probes.probe(None, tls=probes.tls(A)).connect() == DENIED


@pytest.mark.parametrize(
    ("user", "password"),
    [(A, "wrong"), (A, ""), ("ingest", "wrong"), ("scope-z", "whatever"), (A, "x" * 1000)],
)
def test_wrong_passwords_and_unknown_users_are_refused(
    probes: SecuredBroker, user: str, password: str
) -> None:
    assert probes.probe(user, password).connect() == DENIED


def test_a_password_opens_only_its_own_identity(probes: SecuredBroker) -> None:
    assert probes.probe(B, probes.passwords[A]).connect() == DENIED
    assert probes.probe("ingest", probes.passwords[A]).connect() == DENIED


# -- devices --------------------------------------------------------------------------------------


def test_a_device_cannot_publish_into_another_devices_tree(probes: SecuredBroker) -> None:
    ingest = probes.connected("ingest")
    monitor = probes.connected("monitor")
    ingest.subscribe(*UPSTREAM_FILTERS)
    monitor.subscribe(DEVICE_STATUS_FILTER)
    a = probes.connected(A)
    for kind in (*UPSTREAM, DeviceTopic.STATUS, DeviceTopic.ACK):
        assert a.publish(topic(B, kind), b"forged by A") == DENIED, kind
    # A forged ack or a fake ingest status would steer B (or every edge); both refused.
    assert a.publish(ingest_status_topic("ingest-1"), b"forged by A") == DENIED
    assert a.publish(image_status_topic(B, IMAGE), b"x") == DENIED
    assert a.publish(topic(A, DeviceTopic.OPEN), b"sentinel") == "Success"
    assert a.publish(topic(A, DeviceTopic.STATUS), b"sentinel") == "Success"
    assert ingest.wait_for(topic(A, DeviceTopic.OPEN), b"sentinel")
    assert monitor.wait_for(topic(A, DeviceTopic.STATUS), b"sentinel")
    assert not [m for m in ingest.received() + monitor.received() if m[1] == b"forged by A"]
    assert all(t.startswith(f"tilebridge/v1/dev/{A}/") for t, _ in ingest.received())


def test_a_device_cannot_read_another_devices_acks(probes: SecuredBroker) -> None:
    a, b = probes.connected(A), probes.connected(B)
    # A asks for everything it can think of; the subscriptions are accepted, but the broker
    # delivers only what A may read.
    a.subscribe(topic(B, DeviceTopic.ACK), device_filter(DeviceTopic.ACK), "tilebridge/v1/#", "#")
    b.subscribe(topic(B, DeviceTopic.ACK))
    ingest = probes.connected("ingest")
    assert ingest.publish(topic(B, DeviceTopic.ACK), b"for B only") == "Success"
    assert ingest.publish(image_status_topic(B, IMAGE), b"B's image") == ("Success")
    assert ingest.publish(topic(A, DeviceTopic.ACK), b"for A") == "Success"
    assert b.wait_for(topic(B, DeviceTopic.ACK), b"for B only")
    assert a.wait_for(topic(A, DeviceTopic.ACK), b"for A")
    assert {t for t, _ in a.received()} == {topic(A, DeviceTopic.ACK)}


def test_a_device_cannot_read_other_devices_uploads_or_status(probes: SecuredBroker) -> None:
    a = probes.connected(A)
    a.subscribe(*UPSTREAM_FILTERS, DEVICE_STATUS_FILTER, IMAGE_STATUS_FILTER)
    a.subscribe(INGEST_STATUS_FILTER)
    b = probes.connected(B)
    for kind in (*UPSTREAM, DeviceTopic.STATUS):
        assert b.publish(topic(B, kind), b"B's data") == "Success"
    ingest = probes.connected("ingest")
    assert ingest.publish(ingest_status_topic("ingest-1"), b"online") == "Success"
    assert a.wait_for(ingest_status_topic("ingest-1"), b"online")  # what an edge may read
    assert {t for t, _ in a.received()} == {ingest_status_topic("ingest-1")}


# -- the ingest identity ----------------------------------------------------------------------


@pytest.mark.parametrize("ingest_user", ["ingest", "ingest-2"])
def test_the_ingest_reads_every_devices_tree(probes: SecuredBroker, ingest_user: str) -> None:
    ingest = probes.connected(ingest_user)
    ingest.subscribe(*UPSTREAM_FILTERS)
    devices = {A: probes.connected(A), B: probes.connected(B)}
    for name, device in devices.items():
        for kind in UPSTREAM:
            assert device.publish(topic(name, kind), f"{name} {kind}".encode()) == "Success"
    for name in devices:
        for kind in UPSTREAM:
            assert ingest.wait_for(topic(name, kind), f"{name} {kind}".encode())


def test_the_ingest_answers_and_reports_but_cannot_pose_as_a_device(probes: SecuredBroker) -> None:
    ingest = probes.connected("ingest")
    watcher = probes.connected("ingest-2")
    watcher.subscribe(*UPSTREAM_FILTERS)
    assert ingest.publish(topic(A, DeviceTopic.ACK), b"ack") in ACCEPTED
    assert ingest.publish(ingest_status_topic("ingest-1"), b"status") in ACCEPTED
    assert ingest.publish(image_status_topic(A, IMAGE), b"s") in ACCEPTED
    for kind in (*UPSTREAM, DeviceTopic.STATUS):
        assert ingest.publish(topic("ingest", kind), b"posing") == DENIED
    for kind in UPSTREAM:
        assert ingest.publish(topic(A, kind), b"posing") == DENIED
    # It may clear a removed device's retained status (`device remove`, issue 13): its acks
    # could already make a device drop data, so this gives it nothing more to abuse.
    assert ingest.publish(topic(A, DeviceTopic.STATUS), b"", retain=True) in ACCEPTED
    a = probes.connected(A)
    assert a.publish(topic(A, DeviceTopic.CLOSE), b"sentinel") == "Success"
    assert watcher.wait_for(topic(A, DeviceTopic.CLOSE), b"sentinel")
    assert not [m for m in watcher.received() if m[1] == b"posing"]


# -- the monitor identity ---------------------------------------------------------------------


def test_the_monitor_reads_status_and_publishes_nothing(probes: SecuredBroker) -> None:
    monitor = probes.connected("monitor")
    monitor.subscribe("#")
    ingest = probes.connected("ingest")
    ingest.subscribe(*UPSTREAM_FILTERS)
    a = probes.connected(A)
    a.subscribe(topic(A, DeviceTopic.ACK), INGEST_STATUS_FILTER)

    forged = [
        *(topic(name, kind) for name in ("monitor", A) for kind in DeviceTopic),
        ingest_status_topic("ingest-1"),
        image_status_topic(A, IMAGE),
        "tilebridge/v1/anything",
        "$SYS/broker/uptime",
    ]
    for t in forged:
        assert monitor.publish(t, b"from the monitor") == DENIED, t

    # What the monitor is for: device, ingest and image status, including retained ones.
    assert a.publish(topic(A, DeviceTopic.STATUS), b"device status", retain=True) == "Success"
    assert a.publish(topic(A, DeviceTopic.OPEN), b"sentinel") == "Success"
    assert ingest.publish(ingest_status_topic("ingest-1"), b"ingest status") == "Success"
    assert ingest.publish(topic(A, DeviceTopic.ACK), b"ack") == "Success"
    image = image_status_topic(A, IMAGE)
    assert ingest.publish(image, b"image status") == "Success"
    assert monitor.wait_for(topic(A, DeviceTopic.STATUS), b"device status")
    assert monitor.wait_for(ingest_status_topic("ingest-1"), b"ingest status")
    assert monitor.wait_for(image, b"image status")
    assert ingest.wait_for(topic(A, DeviceTopic.OPEN), b"sentinel")
    assert a.wait_for(topic(A, DeviceTopic.ACK), b"ack")
    everyone = monitor.received() + ingest.received() + a.received()
    assert not [m for m in everyone if m[1] == b"from the monitor"]
    # No tiles, manifests or acks for the monitor, and no $SYS.
    assert all(t.endswith("/status") for t, _ in monitor.received())

    late = probes.connected("monitor")
    late.subscribe(DEVICE_STATUS_FILTER)
    assert late.wait_for(topic(A, DeviceTopic.STATUS), b"device status")  # retained
    assert a.publish(topic(A, DeviceTopic.STATUS), b"", retain=True) == "Success"  # clean up


# -- TLS ------------------------------------------------------------------------------------------


def test_a_tls_client_with_a_valid_certificate_connects(probes: SecuredBroker) -> None:
    a = probes.connected(A, tls=probes.tls(A))
    a.subscribe(topic(A, DeviceTopic.ACK))
    ingest = probes.connected("ingest")
    assert ingest.publish(topic(A, DeviceTopic.ACK), b"over tls") == "Success"
    assert a.wait_for(topic(A, DeviceTopic.ACK), b"over tls")


def test_a_tls_client_without_a_certificate_is_refused(probes: SecuredBroker) -> None:
    result = probes.probe(A, tls=probes.tls(None)).connect()
    assert result != "Success"
    assert "certificate" in probes.broker.log_tail(50)  # "peer did not return a certificate"


def test_a_certificate_from_another_ca_is_refused(probes: SecuredBroker, tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(MAKE_CERTS), "-o", str(tmp_path), A], check=True, capture_output=True
    )
    rogue = Tls(
        probes.broker.ca_file, tmp_path / "devices" / f"{A}.crt", tmp_path / "devices" / f"{A}.key"
    )
    assert probes.probe(A, tls=rogue).connect() != "Success"


def test_tls_needs_the_password_too(probes: SecuredBroker) -> None:
    assert probes.probe(A, "wrong", tls=probes.tls(A)).connect() == DENIED


def test_the_tls_listener_speaks_no_plain_mqtt(probes: SecuredBroker) -> None:
    assert probes.probe(A, port=probes.broker.tls_port).connect() != "Success"

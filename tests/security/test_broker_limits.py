"""The limits in mosquitto/tilebridge.conf hold on the installed Mosquitto.

The queue limits are shown with small values put in place of the shipped ones (the same lines
of tilebridge.conf, `Mosquitto(settings=...)`), on an offline persistent session: a
subscriber subscribes with a session that outlives its connection and goes away, messages are
published (each PUBACK means Mosquitto has queued or dropped it), the subscriber comes back
and counts what the broker kept. The shipped values are then checked to lie where Mosquitto
2.0.11 reads them correctly: it reads max_queued_bytes as a 32-bit int, which is why
2147483648 was not enforced (shown here too, with the wrap-around above it).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devtools.broker import Mosquitto
from devtools.broker_config import SETTINGS, options
from tests.security.conftest import Probe, wait_until

TOPIC = "limits/queued"
SENTINEL = b"sentinel"
SIZE = 1000
SENT = 25
MiB = 1024 * 1024


def shipped() -> dict[str, str]:
    return dict(options(SETTINGS.read_text()))


def kept_for_offline_session(broker: Mosquitto, sent: int = SENT, size: int = SIZE) -> int:
    """How many of `sent` QoS 1 messages of `size` bytes the broker keeps for a session whose
    client is away."""
    session = {"client_id": "offline-session", "session_expiry": 3600}
    subscriber = Probe(broker.port, **session)  # type: ignore[arg-type]
    assert subscriber.connect() == "Success"
    subscriber.subscribe(TOPIC)
    subscriber.close()  # the session and its subscription stay
    publisher = Probe(broker.port)
    back = Probe(broker.port, **session)  # type: ignore[arg-type]
    try:
        assert publisher.connect() == "Success"
        for _ in range(sent):
            assert publisher.publish(TOPIC, bytes(size)) in ("Success", "No matching subscribers")
        assert back.connect(clean_start=False) == "Success"
        # Delivered after everything queued before it: once it is here, the count is final.
        assert publisher.publish(TOPIC, SENTINEL) == "Success"
        assert back.wait_for(TOPIC, SENTINEL), broker.log_tail()
        return len([p for _, p in back.received(TOPIC) if p != SENTINEL])
    finally:
        publisher.close()
        back.close()


def dropped_for(broker: Mosquitto, client_id: str) -> bool:
    line = f"Outgoing messages are being dropped for client {client_id}."
    return line in broker.log_path.read_text()


def test_max_queued_messages_drops_at_the_configured_count(tmp_path: Path) -> None:
    with Mosquitto(tmp_path, settings={"max_queued_messages": 7}) as broker:
        assert kept_for_offline_session(broker) == 7
        assert dropped_for(broker, "offline-session")  # what the admin sees in the log


@pytest.mark.parametrize(
    ("limit", "kept"),
    [
        (10 * SIZE, 10),
        # Read as a 32-bit int: 2^31 becomes negative, i.e. no limit at all; 2^32 + 10000
        # becomes 10000. Shipped values must stay below 2^31.
        (2**31, SENT),
        (2**32 + 10 * SIZE, 10),
    ],
)
def test_max_queued_bytes_drops_at_the_configured_size(
    tmp_path: Path, limit: int, kept: int
) -> None:
    with Mosquitto(tmp_path, settings={"max_queued_bytes": limit}) as broker:
        assert kept_for_offline_session(broker) == kept
        assert dropped_for(broker, "offline-session") is (kept < SENT)


def test_the_shipped_limits_are_values_mosquitto_enforces() -> None:
    values = shipped()
    queued_bytes = int(values["max_queued_bytes"])
    queued_messages = int(values["max_queued_messages"])
    assert 0 < queued_bytes < 2**31
    assert 0 < queued_messages < 2**31
    # Room for the full in-flight window of a device (64 MiB) many times over.
    assert queued_bytes >= 16 * 64 * MiB
    message, packet = int(values["message_size_limit"]), int(values["max_packet_size"])
    # The largest chunk the edge sends (4 MiB raw + header) passes both.
    assert 4 * MiB + 4096 < message < packet < 2**28
    assert int(values["max_inflight_messages"]) > 0


def test_an_oversize_packet_disconnects_only_its_sender(tmp_path: Path) -> None:
    """max_packet_size as shipped: the sender of a bigger packet is cut off, others go on."""
    limit = int(shipped()["max_packet_size"])
    with Mosquitto(tmp_path) as broker:
        bystander, sender = Probe(broker.port), Probe(broker.port)
        try:
            assert bystander.connect() == "Success" and sender.connect() == "Success"
            bystander.subscribe("limits/#")
            sender.client.publish("limits/big", bytes(limit + 1), qos=1)
            # (Its DISCONNECT says "Packet too large", but a sender still writing 16 MiB may
            # see its socket closed before it reads that.)
            assert sender.disconnected.wait(10)
            assert "disconnected due to oversize packet" in broker.log_path.read_text()
            assert bystander.publish("limits/after", b"still here") == "Success"
            assert bystander.wait_for("limits/after", b"still here")
            assert not bystander.received("limits/big")
        finally:
            bystander.close()
            sender.close()


def test_an_unauthenticated_client_cannot_make_the_broker_buffer_a_huge_packet(
    tmp_path: Path,
) -> None:
    """The limit applies before authentication: a CONNECT declaring 100 MiB is refused on its
    first bytes, on a broker that accepts no anonymous client at all."""
    with Mosquitto.secured(tmp_path, {"ingest": "pw"}) as broker:
        with socket.create_connection((broker.host, broker.port), timeout=10) as raw:
            raw.sendall(b"\x10" + _varint(100 * MiB) + bytes(1000))
            assert _closed(raw)
        assert wait_until(
            lambda: "<unknown> disconnected due to oversize packet" in broker.log_path.read_text()
        )


def _varint(value: int) -> bytes:
    """MQTT's variable-length integer (the remaining length of a packet)."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True

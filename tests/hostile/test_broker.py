"""Attacks on the broker itself by a holder of one valid identity (or of none).

Client-id takeover: any identity, even `monitor`, asks for the ingest's or a device's client
id, with a clean start (which would discard the victim's session) and without (which would
resume it: the queue is delivered to the attacker, and what the ACL does not let it read is
dropped). The broker replaces every client id by the username (`use_username_as_clientid`),
so the attacker only ever reaches its own session: the victims stay connected, keep their
sessions and get their queued messages. (Without the binding every test here fails.)

Listener attacks: plain MQTT on the TLS listener, TLS without a client certificate or with
one from another CA, a certificate without a password, garbage instead of a handshake. None
gets in; the ingest stays online and the well-behaved device's scan completes.

"Received nothing" is shown without sleeping: an attacker that had taken over a session
would get its queued messages right after CONNACK, before the retained status it subscribes
to next; once that status is there, the queue would have been too.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devtools.broker import MAKE_CERTS
from devtools.stack import wait_for
from edge_agent.simulate import SyntheticScan
from tests.hostile.conftest import EVIL, GOOD, INGEST_RSS_BOUND, INSTANCE, Hostile
from tests.security.conftest import Probe, Tls
from tilebridge_protocol.framing import encode_tile
from tilebridge_protocol.messages import TileAck, TileState, decode_ack
from tilebridge_protocol.topics import (
    INGEST_STATUS_FILTER,
    DeviceTopic,
    device_topic,
    ingest_status_topic,
)

# What the programs ask for (server_ingest/app.py, edge_agent/app.py), and what the
# broker names them after binding: their usernames.
INGEST_IDS = (f"tb-ingest-{INSTANCE}", "ingest")
DEVICE_IDS = (f"tb-edge-{GOOD}", GOOD)


def attacker(hostile: Hostile, user: str, client_id: str, session: bool = True) -> Probe:
    """`user` asking for `client_id`, over the listener `user` normally uses."""
    tls = hostile.tls(user) if user in (GOOD, EVIL) else None
    return hostile.client(
        user, tls=tls, client_id=client_id, session_expiry=3600 if session else None
    )


def connect_once(hostile: Hostile, user: str, client_id: str, **kw: Any) -> None:
    """One attempt: `user` connects asking for `client_id`, and goes away again."""
    probe = attacker(hostile, user, client_id, **kw)
    assert probe.connect() == "Success"
    probe.close()


def nothing_but_status(probe: Probe) -> list[tuple[str, bytes]]:
    """What `probe` got besides the retained ingest status it subscribed to as a sentinel."""
    probe.subscribe(INGEST_STATUS_FILTER)
    assert probe.wait_for(ingest_status_topic(INSTANCE)), "no retained ingest status"
    return [(t, p) for t, p in probe.received() if t != ingest_status_topic(INSTANCE)]


def ingest_states(hostile: Hostile) -> list[str]:
    return [s["state"] for s in hostile.status.all(f"/ingest/{INSTANCE}/status")]


# -- client-id takeover ---------------------------------------------------------------------


@pytest.mark.parametrize("user", ["monitor", EVIL])
def test_no_identity_can_kick_the_ingest(hostile: Hostile, user: str) -> None:
    ingest = hostile.start_ingest()
    before = len(ingest_states(hostile))
    with hostile.rss(ingest) as rss:
        for _ in range(10):  # a takeover loop, as fast as the attacker can connect
            for wanted in INGEST_IDS:
                connect_once(hostile, user, wanted)  # a clean start
                resumed = attacker(hostile, user, wanted)
                assert resumed.connect(clean_start=False) == "Success"
                resumed.close()
        result = hostile.scan()
    assert result.ok, result.log
    assert "offline" not in ingest_states(hostile)[before:]  # the broker never sent its will
    assert ingest.running and "disconnected" not in ingest.log_tail(500)
    log = hostile.broker.log_path.read_text()
    assert f"as {user} (" in log and "as tb-ingest-" not in log  # named after the attacker
    closed = [line for line in log.splitlines() if "closing old connection" in line]
    assert all(f"Client {user} already connected" in line for line in closed), closed
    assert rss.peak < INGEST_RSS_BOUND


def test_no_identity_can_resume_or_discard_the_ingests_session(
    hostile: Hostile, tmp_path: Path
) -> None:
    """The ingest is down; tiles wait for it in its session. Attackers ask for its client id,
    resuming (the tiles would go to them, or be dropped by the ACL) and with a clean start
    (the tiles would be discarded). The ingest comes back and commits every tile from its
    queue: nothing re-sent them, the device here is a raw client."""
    ingest = hostile.start_ingest()
    ingest.stop()  # a clean stop keeps the persistent session and its subscriptions
    wait_for(lambda: "offline" in ingest_states(hostile), 10, "the ingest's offline status")
    device = hostile.client(GOOD, tls=hostile.tls(GOOD))
    assert device.connect() == "Success"
    device.subscribe(device_topic(GOOD, DeviceTopic.ACK))
    tiles = publish_image(device)  # every PUBACK: queued for the ingest's session

    for user in ("monitor", EVIL):
        for wanted in INGEST_IDS:
            resumed = attacker(hostile, user, wanted)
            assert resumed.connect(clean_start=False) == "Success"
            assert nothing_but_status(resumed) == [], f"{user} as {wanted} got the queue"
            resumed.close()
            connect_once(hostile, user, wanted)

    hostile.start_ingest()
    wait_for(lambda: committed(device) == set(tiles), 30, "every queued tile committed")
    device.close()  # one identity, one connection: the scan below is GOOD too
    assert hostile.scan().ok


@pytest.mark.parametrize("user", ["monitor", EVIL, "ingest"])
def test_no_identity_can_take_or_drain_a_devices_session(hostile: Hostile, user: str) -> None:
    """The device is away; acks wait for it in its session. Whoever asks for its client id
    (even the ingest, which writes those acks) neither gets them nor discards them, and a
    device that is online is not kicked."""
    victim = hostile.client(
        GOOD, tls=hostile.tls(GOOD), client_id=DEVICE_IDS[0], session_expiry=3600
    )
    assert victim.connect() == "Success"
    victim.subscribe(device_topic(GOOD, DeviceTopic.ACK))
    victim.close()  # away, session kept
    ingest = hostile.client("ingest")
    assert ingest.connect() == "Success"
    assert (
        ingest.publish(ingest_status_topic(INSTANCE), b'{"sentinel":1}', retain=True) == "Success"
    )
    for n in range(3):
        assert ingest.publish(device_topic(GOOD, DeviceTopic.ACK), f"ack {n}".encode()) == "Success"
    if user == "ingest":
        ingest.close()  # one identity, one connection: the attacker is the next one

    for wanted in DEVICE_IDS:
        resumed = attacker(hostile, user, wanted)
        assert resumed.connect(clean_start=False) == "Success"
        assert nothing_but_status(resumed) == [], f"{user} as {wanted} got the device's acks"
        resumed.close()
        connect_once(hostile, user, wanted, session=False)

    back = hostile.client(GOOD, tls=hostile.tls(GOOD), client_id=DEVICE_IDS[0], session_expiry=3600)
    assert back.connect(clean_start=False) == "Success"
    for n in range(3):
        assert back.wait_for(device_topic(GOOD, DeviceTopic.ACK), f"ack {n}".encode())
    for wanted in DEVICE_IDS:  # and, online now, it is not kicked either
        connect_once(hostile, user, wanted, session=False)
    assert not back.disconnected.is_set()


# -- the listeners --------------------------------------------------------------------------


def test_plain_tcp_and_tls_without_a_valid_certificate_are_refused(
    hostile: Hostile, tmp_path: Path
) -> None:
    ingest = hostile.start_ingest()
    b = hostile.broker
    assert b.tls_port is not None
    rogue_dir = tmp_path / "rogue-ca"
    subprocess.run(["bash", str(MAKE_CERTS), "-o", str(rogue_dir), EVIL], check=True,
                   capture_output=True)  # fmt: skip
    rogue = Tls(
        b.ca_file, rogue_dir / "devices" / f"{EVIL}.crt", rogue_dir / "devices" / f"{EVIL}.key"
    )
    attempts: dict[str, dict[str, Any]] = {
        "plain MQTT on the TLS listener": {"port": b.tls_port},
        "TLS without a client certificate": {"tls": hostile.tls(None)},
        "a certificate of another CA": {"tls": rogue},
    }
    with hostile.rss(ingest) as rss:
        for _ in range(5):
            for what, how in attempts.items():
                assert hostile.client(EVIL, **how).connect() != "Success", what
            # A valid certificate is not an identity: the password is still required.
            assert hostile.client(None, tls=hostile.tls(EVIL)).connect() == "Not authorized"
            assert (
                hostile.client(EVIL, "wrong", tls=hostile.tls(EVIL)).connect() == "Not authorized"
            )
            assert hostile.client(None).connect() == "Not authorized"  # anonymous, loopback
            assert garbage_is_dropped(b.host, b.tls_port)
        result = hostile.scan()
    assert result.ok, result.log
    assert "offline" not in ingest_states(hostile)
    assert rss.peak < INGEST_RSS_BOUND
    log = b.log_path.read_text()
    assert "peer did not return a certificate" in log and "certificate verify failed" in log


def garbage_is_dropped(host: str, port: int) -> bool:
    """Bytes that are no TLS handshake: the broker closes the connection."""
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"\x10\xff\xff\xff\x7f" + bytes(4096))
        try:
            return raw.recv(1) in (b"", b"\x15")  # closed, or a TLS alert
        except (ConnectionResetError, ssl.SSLError):
            return True


# -- helpers ----------------------------------------------------------------------------------


def publish_image(device: Probe) -> list[Any]:
    """A small image's manifest and tiles, published by `device` as the edge would."""
    scan = SyntheticScan(columns=2, rows=1, tile_size=64, seed=99)
    manifest = scan.manifest()
    assert device.publish(device_topic(GOOD, DeviceTopic.OPEN), manifest.to_bytes()) == "Success"
    keys = manifest.tile_keys()
    for key in keys:
        for message in encode_tile(manifest.image_id, key, scan.frame(key).tobytes()):
            assert device.publish(device_topic(GOOD, DeviceTopic.CHUNK), message) == "Success"
    return list(keys)


def committed(device: Probe) -> set[Any]:
    """The tiles the ingest answered `committed` to, on the device's ack topic."""
    answers = [decode_ack(p) for _, p in device.received(device_topic(GOOD, DeviceTopic.ACK))]
    return {a.tile for a in answers if isinstance(a, TileAck) and a.state is TileState.COMMITTED}

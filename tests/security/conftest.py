"""A real Mosquitto in secured mode (passwords, the repository's ACL, a TLS listener that
requires client certificates) and a small synchronous MQTT 5 test client."""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devtools.broker import Mosquitto

IDENTITIES = ("scope-a", "scope-b", "ingest", "ingest-2", "monitor")
TLS_DEVICES = ("scope-a", "scope-b")
TIMEOUT = 10.0


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll `predicate` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path | None = None
    key: Path | None = None


class Probe:
    """A paho MQTT 5 client that connects, subscribes and publishes synchronously and keeps
    every message it receives.

    By default it asks for a random client id and a session that ends with the connection;
    `client_id` and `session_expiry` (seconds) make it ask for a given id and a persistent
    session, as the services do (`connect(clean_start=False)` resumes one)."""

    def __init__(
        self,
        port: int,
        username: str | None = None,
        password: str | None = None,
        tls: Tls | None = None,
        host: str = "127.0.0.1",
        client_id: str | None = None,
        session_expiry: int | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id or f"probe-{uuid4().hex[:12]}"
        self.session_expiry = session_expiry
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(60, 120)  # a refused probe must not hammer the broker
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: str | None = None
        self.disconnect_reason: str | None = None
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[str]] = {}
        self._pubacks: dict[int, str] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self._started = False

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = str(reason)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnect_reason = str(reason)
        self.disconnected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        self._subacks[mid] = [str(r) for r in reasons]

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._pubacks[mid] = str(reason)

    def connect(self, clean_start: bool = True) -> str:
        """'Success', the broker's refusal, or why the connection failed."""
        properties = None
        if self.session_expiry is not None:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry
        try:
            self.client.connect(
                self.host, self.port, keepalive=30, clean_start=clean_start, properties=properties
            )
        except (OSError, ssl.SSLError) as exc:
            return f"failed: {exc}"
        self.client.loop_start()
        self._started = True
        wait_until(lambda: self.connack is not None or self.disconnected.is_set())
        if self.connack is not None:
            return self.connack
        return "disconnected" if self.disconnected.is_set() else "no answer"

    def subscribe(self, *filters: str) -> list[str]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None
        assert wait_until(lambda: mid in self._subacks), "no SUBACK"
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        """Publish with QoS 1 and return the PUBACK's reason. Once the PUBACK is here the
        broker has routed the message: anything it delivers is already queued."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert wait_until(lambda: info.mid in self._pubacks), f"no PUBACK for {topic}"
        return self._pubacks[info.mid]

    def received(self, topic: str | None = None) -> list[tuple[str, bytes]]:
        return [
            (m.topic, bytes(m.payload)) for m in list(self.messages) if topic in (None, m.topic)
        ]

    def wait_for(self, topic: str, payload: bytes | None = None) -> bool:
        return bool(
            wait_until(
                lambda: any(p == payload or payload is None for _, p in self.received(topic))
            )
        )

    def close(self) -> None:
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()
            self._started = False
        # paho's wake-up socket pair is closed only by the client's __del__, which a garbage
        # collected reference cycle may run after the sockets' own finalizers (ResourceWarning).
        self.client._reset_sockets()


class SecuredBroker:
    def __init__(self, broker: Mosquitto, passwords: dict[str, str]) -> None:
        self.broker = broker
        self.passwords = passwords
        self._probes: list[Probe] = []

    def tls(self, device: str | None) -> Tls:
        if device is None:
            return Tls(self.broker.ca_file)
        cert, key = self.broker.client_cert(device)
        return Tls(self.broker.ca_file, cert, key)

    def probe(
        self, user: str | None, password: str | None = None, port: int | None = None, **kw: Any
    ) -> Probe:
        """A probe for `user` (its own password unless given), on the plain listener unless
        `tls=` is given; not yet connected."""
        if user is not None and password is None:
            password = self.passwords[user]
        if port is None:
            port = self.broker.tls_port if kw.get("tls") is not None else self.broker.port
        assert port is not None
        probe = Probe(port, user, password, **kw)
        self._probes.append(probe)
        return probe

    def connected(self, user: str, **kw: Any) -> Probe:
        probe = self.probe(user, **kw)
        assert probe.connect() == "Success", self.broker.log_tail()
        return probe

    def close_probes(self) -> None:
        for probe in self._probes:
            probe.close()
        self._probes.clear()


def start_secured(
    workdir: Path, identities: tuple[str, ...] = IDENTITIES, acl: Path | None = None
) -> SecuredBroker:
    passwords = {name: secrets.token_urlsafe(24) for name in identities}
    broker = Mosquitto.secured(
        workdir, passwords, acl=acl, tls=True, tls_clients=TLS_DEVICES
    ).start()
    return SecuredBroker(broker, passwords)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    env = start_secured(tmp_path_factory.mktemp("secured-broker"))
    try:
        yield env
    finally:
        env.close_probes()
        env.broker.stop()


@pytest.fixture
def probes(secured: SecuredBroker) -> Iterator[SecuredBroker]:
    """The module's broker; the probes a test makes are closed after it."""
    yield secured
    secured.close_probes()

"""How both services reach the broker: connection settings, the paho client, a network
thread that reconnects with jittered backoff."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from tilebridge_runtime.backoff import Backoff

# A persistent session outlives a disconnect by this long; the broker's
# `persistent_client_expiration` may cut it shorter.
SESSION_EXPIRY_S = 7 * 24 * 3600

log = logging.getLogger(__name__)


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    """Read the password from this file (preferred over `password` in config files)."""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)

    def secret(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password.get_secret_value() if self.password else None


def make_client(settings: BrokerSettings, client_id: str) -> mqtt.Client:
    """An MQTT 5 client that keeps its session (and so its queued QoS 1 messages) across
    disconnects; call `connect_properties()` when connecting."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if settings.username:
        client.username_pw_set(settings.username, settings.secret())
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    # Matches the broker's max_inflight_messages; callers bound paho's queue with their window.
    client.max_inflight_messages_set(32)
    return client


def connect_properties(session_expiry_s: int = SESSION_EXPIRY_S) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props


def expiring(seconds: int) -> Properties:
    """PUBLISH properties that make the broker drop a (retained) message after `seconds`."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = seconds
    return props


class MqttConnection:
    """One paho client plus a named network thread that reconnects with jittered backoff.

    paho's own `loop_start()` reconnects without jitter, so a fleet of microscopes would all
    hammer a restarted broker at the same instants; this loop spreads them out.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        name: str,
        on_connected: Callable[[mqtt.Client], None],
        on_message: Callable[[mqtt.MQTTMessage], None],
        on_published: Callable[[int], None] | None = None,
        will: tuple[str, bytes] | None = None,
        backoff: Backoff | None = None,
        session_expiry_s: int = SESSION_EXPIRY_S,
    ) -> None:
        """`session_expiry_s`: how long the broker keeps our session (subscriptions, queued
        messages) after we disconnect."""
        self.settings = settings
        self._session_expiry_s = session_expiry_s
        self.name = name
        self.client = make_client(settings, client_id)
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connects = 0
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_published = on_published
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        # paho writes to the socket from whichever thread calls publish() unless it runs its
        # own loop thread or an external loop claims writing; two writers interleave the bytes
        # of large packets (the broker then drops us for a protocol error). Claim writing:
        # only this connection's thread touches the socket.
        self.client.on_socket_register_write = lambda *_: None
        self.client.on_socket_unregister_write = lambda *_: None
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = lambda _c, _u, msg: self._on_message(msg)
        if on_published is not None:
            self.client.on_publish = lambda _c, _u, mid, _rc, _p: on_published(mid)

    def start(self) -> None:
        self._thread.start()

    def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly (publishing `final`, retained, first) and end the thread."""
        if final is not None and self.connected.is_set():
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            with suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._stop.set()
        with suppress(Exception):
            self.client.disconnect()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        # paho opens a wake-up socket pair per connection and only closes it on the next
        # connect; without a loop thread of its own nothing else releases it.
        reset = getattr(self.client, "_reset_sockets", None)
        if reset is not None:
            reset(sockpair_only=True)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._connect():
                self._stop.wait(self._backoff.next_delay())
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                    self.connected.clear()
                    self.last_error = (
                        self.last_error or f"connection lost ({mqtt.error_string(rc)})"
                    )
                    log.warning("%s: %s", self.name, self.last_error)
                    break
            if not self._stop.is_set():
                self._stop.wait(self._backoff.next_delay())

    def _connect(self) -> bool:
        try:
            if self.connects == 0:
                self.client.connect(
                    self.settings.host,
                    self.settings.port,
                    keepalive=self.settings.keepalive_s,
                    clean_start=False,
                    properties=connect_properties(self._session_expiry_s),
                )
            else:
                self.client.reconnect()
        except (OSError, ssl.SSLError) as exc:
            self.last_error = (
                f"cannot reach broker {self.settings.host}:{self.settings.port}: {exc}"
            )
            log.warning("%s: %s", self.name, self.last_error)
            return False
        self.connects += 1
        return True

    def _handle_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused connection: {reason}"
            log.error("%s: %s", self.name, self.last_error)
            client.disconnect()
            return
        self._backoff.reset()
        self.last_error = None
        self.connected.set()
        log.info("%s: connected to %s:%s", self.name, self.settings.host, self.settings.port)
        self._on_connected(client)

    def _handle_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self.connected.clear()
        refused = (self.last_error or "").startswith("broker refused")
        if not self._stop.is_set() and not refused:  # keep "not authorized" visible
            self.last_error = f"disconnected: {reason}"
            log.warning("%s: %s", self.name, self.last_error)

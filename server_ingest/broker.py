"""The ingest's side of the broker: what it subscribes to, how answers and status go out, and
the thread ("ingest-status") that publishes the instance's retained status."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from uuid import UUID

import paho.mqtt.client as mqtt

from server_ingest.events import Inbound
from server_ingest.settings import ClusterSettings
from server_ingest.state import Snapshot
from server_ingest.status import ingest_status
from tilebridge_protocol.messages import AnyAck, CreditAck
from tilebridge_protocol.status import ImageStatus, IngestStatus, Liveness
from tilebridge_protocol.topics import (
    UPSTREAM,
    DeviceTopic,
    device_filter,
    device_topic,
    image_preview_topic,
    image_status_topic,
    parse_relay_topic,
    relay_filter,
    relay_topic,
    shared_filter,
)
from tilebridge_runtime.mqtt import MqttConnection, expiring

log = logging.getLogger(__name__)


def subscriptions(instance: str, cluster: ClusterSettings, routed: bool) -> list[str]:
    """Every device's uploads (as one member of the shared subscription, or all of them),
    and, when devices are routed between instances, what others relay to this one."""
    filters = [device_filter(kind) for kind in UPSTREAM]
    if cluster.subscription == "shared":
        filters = [shared_filter(cluster.share_group, f) for f in filters]
    return [*filters, relay_filter(instance)] if routed else filters


def subscribe(client: mqtt.Client, filters: list[str]) -> None:
    client.subscribe([(f, 1) for f in filters])


def inbound(message: mqtt.MQTTMessage) -> Inbound:
    relayed = parse_relay_topic(message.topic)
    if relayed is not None:
        return Inbound(relayed, bytes(message.payload), bool(message.retain), relayed=True)
    return Inbound(message.topic, bytes(message.payload), bool(message.retain))


class MqttOutbox:
    """Acks on the device's ack topic; image status retained (expiring once the image is done,
    so the broker does not keep every image's status forever). Called from the core thread;
    paho only queues here, the connection's thread writes the socket."""

    def __init__(
        self, connection: MqttConnection, image_status_ttl_s: int, relay_ttl_s: int = 120
    ) -> None:
        self._connection = connection
        self._ttl = image_status_ttl_s
        self._relay_ttl = expiring(relay_ttl_s)

    def ack(self, device: str, ack: AnyAck) -> None:
        # A window is retained: the device learns it on every (re)connect, ingest up or not.
        retain = isinstance(ack, CreditAck)
        self._connection.publish(
            device_topic(device, DeviceTopic.ACK), ack.to_bytes(), retain=retain
        )

    def relay(self, instance: str, message: Inbound) -> None:
        """Forward a device message to the instance that holds the device; it expires in the
        broker if that instance is gone (the device sends it again)."""
        self._connection.publish(
            relay_topic(instance, message.topic), message.payload, properties=self._relay_ttl
        )

    def image_status(self, status: ImageStatus, done: bool) -> None:
        self._connection.publish(
            image_status_topic(status.device, status.image_id),
            status.to_bytes(),
            retain=True,
            properties=expiring(self._ttl) if done else None,
        )

    def image_preview(self, device: str, image_id: UUID, png: bytes, done: bool) -> None:
        """Called from the preview thread; paho only queues the message."""
        self._connection.publish(
            image_preview_topic(device, image_id),
            png,
            retain=True,
            properties=expiring(self._ttl) if done else None,
        )


class StatusReporter:
    """Publishes the instance's retained status every `interval_s` from the core's snapshot."""

    def __init__(
        self,
        connection: MqttConnection,
        topic: str,
        instance: str,
        snapshot: Callable[[], Snapshot],
        interval_s: float,
    ) -> None:
        self._connection = connection
        self._topic = topic
        self._instance = instance
        self._snapshot = snapshot
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-status", daemon=True)

    def status(self, state: Liveness = Liveness.ONLINE) -> IngestStatus:
        c = self._connection
        return ingest_status(
            self._instance, self._snapshot(), state, c.connected.is_set(), c.last_error
        )

    def publish(self) -> None:
        if self._connection.connected.is_set():
            self._connection.publish(self._topic, self.status().to_bytes(), retain=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.publish()
            except Exception:  # a status report must never end the reporter
                log.exception("status report")

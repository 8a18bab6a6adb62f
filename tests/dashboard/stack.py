"""A real broker, ingest and edge agent in one process, and a status subscriber, for tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import Mosquitto
from edge_agent.app import EdgeApp
from edge_agent.models import ExperimentSpec
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings
from tilebridge_protocol.topics import (
    DEVICE_STATUS_FILTER,
    IMAGE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
)
from tilebridge_runtime.mqtt import BrokerSettings, MqttConnection

DEVICE = "scope-7"


@dataclass
class Stack:
    broker: Mosquitto
    ingest: IngestService
    agent: EdgeApp
    root: Path

    @property
    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(port=self.broker.port)


@contextmanager
def running_stack(
    root: Path,
    *,
    ingest_metrics: int | None = None,
    agent_metrics: int | None = None,
    **ingest_settings: Any,
) -> Iterator[Stack]:
    with Mosquitto(root / "broker") as broker:
        settings = BrokerSettings(port=broker.port)
        ingest = IngestService(
            IngestSettings(
                broker=settings,
                data_dir=root / "ingest",
                status_interval_s=0.5,
                metrics_port=ingest_metrics,
                **ingest_settings,
            )
        ).start()
        try:
            agent = EdgeApp(
                AgentSettings(
                    device_id=DEVICE,
                    broker=settings,
                    spool_dir=root / "spool",
                    min_free_bytes=0,
                    status_interval_s=0.5,
                    metrics_port=agent_metrics,
                )
            ).start()
            try:
                yield Stack(broker, ingest, agent, root)
            finally:
                agent.stop()
                release(agent.connection)
        finally:
            ingest.stop()
            release(ingest.connection)


def release(connection: MqttConnection) -> None:
    """Close the wake-up socket pair paho opens for `loop()`.

    `MqttConnection.stop()` leaves it to the garbage collector, which (the client sits in a
    reference cycle) may finalize the sockets first: an unclosed-socket ResourceWarning that
    pytest turns into an error in whichever test happens to be running.
    """
    connection.client._reset_sockets(sockpair_only=True)


def scan(agent: EdgeApp, scan: SyntheticScan, frame_delay: float = 0.0) -> UUID:
    """Acquire `scan` through the agent (returns once every frame is buffered)."""
    manifest = scan.manifest()
    door = agent.acquisition
    door.start(ExperimentSpec.from_manifest(manifest, targets=[]))
    for key in manifest.tile_keys():
        door.write_frame(
            manifest.image_id, scan.frame(key), tile_index=key.index, z_index=key.z,
            channel_index=key.c,
        )  # fmt: skip
        if frame_delay:
            time.sleep(frame_delay)
    door.finalize(manifest.image_id)
    return manifest.image_id


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    expiry_s: int | None


@dataclass
class StatusCollector:
    """A plain paho subscriber to every status topic, recording what arrives."""

    port: int
    messages: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._connected
        self.client.on_message = self._message

    def __enter__(self) -> StatusCollector:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        return self

    def __exit__(self, *_: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def _connected(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(
            [(f, 1) for f in (DEVICE_STATUS_FILTER, INGEST_STATUS_FILTER, IMAGE_STATUS_FILTER)]
        )

    def _message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        expiry = getattr(msg.properties, "MessageExpiryInterval", None)
        with self._lock:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), expiry))

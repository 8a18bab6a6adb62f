"""The dashboard's broker client: subscribes to the retained status topics, never publishes."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from server_ingest.dashboard.board import StatusBoard
from server_ingest.dashboard.settings import DashboardSettings
from tilebridge_protocol.topics import (
    DEVICE_STATUS_FILTER,
    IMAGE_PREVIEW_FILTER,
    IMAGE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
)
from tilebridge_runtime.mqtt import MqttConnection

STATUS_FILTERS = (
    DEVICE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
    IMAGE_STATUS_FILTER,
    IMAGE_PREVIEW_FILTER,
)


class StatusMonitor:
    def __init__(self, settings: DashboardSettings, board: StatusBoard) -> None:
        self.board = board
        self.connection = MqttConnection(
            settings.broker,
            client_id=settings.client_id,
            name="dashboard-mqtt",
            on_connected=self._connected,
            on_message=self._message,
        )

    def start(self) -> StatusMonitor:
        self.connection.start()
        return self

    def stop(self) -> None:
        self.connection.stop()

    def poll(self) -> None:
        """Report the broker connection on the board (MqttConnection has no disconnect hook)."""
        connected = self.connection.connected.is_set()
        self.board.set_monitor(connected, None if connected else self.connection.last_error)

    def _connected(self, client: mqtt.Client) -> None:
        # Whatever changed while disconnected (e.g. a cleared topic) is only right after a
        # fresh start: the subscription below brings every retained status again.
        self.board.reset()
        self.board.set_monitor(True, None)
        # QoS 0: the broker then queues nothing for this session while the dashboard is down.
        client.subscribe([(topic, 0) for topic in STATUS_FILTERS])

    def _message(self, msg: mqtt.MQTTMessage) -> None:
        expiry = getattr(msg.properties, "MessageExpiryInterval", None)
        self.board.apply(
            msg.topic, bytes(msg.payload), float(expiry) if expiry is not None else None
        )

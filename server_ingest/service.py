"""The ingest service: broker subscription, acks and retained status around `Ingest`."""

from __future__ import annotations

import logging
import resource
import threading

import paho.mqtt.client as mqtt

from server_ingest.backends import build_backends
from server_ingest.ingest import Ack, ImageProgress, Ingest
from server_ingest.ledger import ImageRecord, Ledger, Phase
from server_ingest.metrics import serve_metrics
from server_ingest.settings import IngestSettings
from server_ingest.staging import Staging
from server_ingest.storer import Storer
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import ImagePhase, ImageStatus, IngestStatus, Liveness
from tilebridge_protocol.topics import (
    UPSTREAM,
    DeviceTopic,
    device_filter,
    device_topic,
    image_status_topic,
    ingest_status_topic,
)
from tilebridge_runtime.mqtt import MqttConnection, expiring

log = logging.getLogger(__name__)


def raise_open_file_limit() -> None:
    """Backends may hold a memory map (one file descriptor) per staged tile of an image that
    is still being written; the usual soft limit of 1024 is far too low for big mosaics."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class IngestService:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.ledger = Ledger(settings.ledger_path)
        self.staging = Staging(settings.staging_dir)
        self.storer = Storer(
            build_backends(settings), self.ledger, self.staging, settings.keep_staged,
            settings.store_retry_s, settings.store_retry_max_s,
        )  # fmt: skip
        self.ingest = Ingest(self.ledger, self.staging, self, self.storer, settings.limits)
        self.storer.listener = self.ingest
        self.status_topic = ingest_status_topic(settings.instance)
        offline = IngestStatus(at=utcnow(), instance=settings.instance, state=Liveness.OFFLINE)
        self.connection = MqttConnection(
            settings.broker,
            client_id=f"tb-ingest-{settings.instance}",
            name="ingest-mqtt",
            on_connected=self._connected,
            on_message=self._message,
            will=(self.status_topic, offline.to_bytes()),
        )
        self._stop = threading.Event()
        self._status_thread = threading.Thread(
            target=self._report, name="ingest-status", daemon=True
        )

    def start(self) -> IngestService:
        raise_open_file_limit()
        serve_metrics(self, self._stop)
        self.storer.start()
        resumed = self.ingest.recover()
        if resumed:
            log.info("resuming %d images that were being stored", len(resumed))
        self.connection.start()
        self._status_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        offline = self.status(Liveness.OFFLINE)
        self.connection.stop(final=(self.status_topic, offline.to_bytes()))
        self.ingest.close()
        self.storer.stop()
        self.ledger.close()

    def __enter__(self) -> IngestService:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- broker -----------------------------------------------------------------------------

    def _connected(self, client: mqtt.Client) -> None:
        client.subscribe([(device_filter(kind), 1) for kind in UPSTREAM])
        self._publish_status()

    def _message(self, msg: mqtt.MQTTMessage) -> None:
        self.ingest.handle(msg.topic, bytes(msg.payload))

    # -- Outbox -----------------------------------------------------------------------------

    def ack(self, device: str, ack: Ack) -> None:
        self.connection.publish(device_topic(device, DeviceTopic.ACK), ack.to_bytes())

    def image_changed(self, record: ImageRecord, progress: ImageProgress) -> None:
        manifest = record.manifest
        status = ImageStatus(
            at=utcnow(),
            device=record.device,
            image_id=record.image_id,
            experiment=manifest.experiment if manifest else "",
            image_name=manifest.image_name if manifest else "",
            phase=ImagePhase(record.phase.value),
            tiles_total=manifest.tile_count if manifest else 0,
            tiles_received=progress.committed + progress.partial,
            tiles_committed=progress.committed,
            tiles_stored=progress.stored,
            locations=record.locations,
            error=record.error,
        )
        done = record.phase in (Phase.COMPLETE, Phase.FAILED, Phase.REJECTED)
        # A finished image's retained status expires, so the broker does not keep it forever.
        props = expiring(self.settings.image_status_ttl_s) if done else None
        self.connection.publish(
            image_status_topic(record.device, record.image_id), status.to_bytes(),
            retain=True, properties=props,
        )  # fmt: skip

    # -- own status -------------------------------------------------------------------------

    def status(self, state: Liveness = Liveness.ONLINE) -> IngestStatus:
        stats = self.ingest.stats
        return IngestStatus(
            at=utcnow(),
            instance=self.settings.instance,
            state=state,
            broker_connected=self.connection.connected.is_set(),
            images_in_progress=self.ingest.images_in_progress(),
            staging_bytes=self.staging.bytes_used(),
            tiles_committed=stats.tiles_committed,
            chunks_rejected=sum(stats.rejections.values()),
            backends=dict(self.storer.backend_state),
            last_error=stats.last_error or self.connection.last_error,
        )

    def _publish_status(self) -> None:
        if self.connection.connected.is_set():
            self.connection.publish(self.status_topic, self.status().to_bytes(), retain=True)

    def _report(self) -> None:
        while not self._stop.wait(self.settings.status_interval_s):
            try:
                self._publish_status()
            except Exception:
                log.exception("status report")

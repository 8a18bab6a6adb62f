"""The edge agent: the disk buffer, the publisher and the status reporter, wired once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import numpy as np

from edge_agent.buffer import DiskBuffer
from edge_agent.metrics import serve_metrics
from edge_agent.publisher import Publisher
from edge_agent.settings import AgentSettings
from tilebridge_protocol.errors import TilebridgeError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, ImageAck, OpenManifest, utcnow
from tilebridge_protocol.status import BackendProgress, DeviceStatus, Liveness
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_runtime.mqtt import MqttConnection

log = logging.getLogger(__name__)

BackendsSource = Callable[[], Mapping[str, BackendProgress] | None]


class EdgeAgent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device = settings.device_id
        self.buffer = DiskBuffer(settings.spool_dir, settings.min_free_bytes)
        self.status_topic = device_topic(self.device, DeviceTopic.STATUS)
        offline = DeviceStatus(at=utcnow(), device=self.device, state=Liveness.OFFLINE)
        self.connection = MqttConnection(
            settings.broker,
            client_id=f"tb-edge-{self.device}",
            name="edge-mqtt",
            on_connected=self._connected,
            # late-bound: the publisher needs the connection, so it is made after it
            on_message=lambda msg: self.publisher.on_message(msg),  # noqa: PLW0108
            on_published=lambda mid: self.publisher.on_published(mid),  # noqa: PLW0108
            will=(self.status_topic, offline.to_bytes()),
        )
        self.publisher = Publisher(settings, self.buffer, self.connection, self._image_done)
        self.current_experiment: str | None = None
        self.last_error: str | None = None
        self._done: dict[UUID, ImageAck] = {}
        self._done_cond = threading.Condition()
        self._stop = threading.Event()
        self._status_thread = threading.Thread(target=self._report, name="edge-status", daemon=True)
        self._last_committed = (time.monotonic(), 0)
        self._throughput = 0.0
        self._backends_source: BackendsSource | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> EdgeAgent:
        serve_metrics(self, self._stop)
        self.publisher.start()
        self.connection.start()
        self._status_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.publisher.stop()
        offline = self.status(Liveness.OFFLINE)
        self.connection.stop(final=(self.status_topic, offline.to_bytes()))
        self.buffer.close()

    def __enter__(self) -> EdgeAgent:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- acquisition ------------------------------------------------------------------------

    def open_image(self, manifest: OpenManifest) -> bool:
        self.current_experiment = manifest.experiment
        with self._reporting("opening an image"):
            return self.buffer.add_open(manifest)

    def write_tile(self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any]) -> bool:
        """Make one frame durable and queue it; returns without waiting on the network."""
        with self._reporting(f"buffering tile {tuple(key)}"):
            manifest = self.buffer.manifest(image_id)
            data = np.ascontiguousarray(pixels, dtype=manifest.dtype.numpy)
            return self.buffer.add_tile(image_id, key, data.data.cast("B"))

    def finalize(self, image_id: UUID) -> CloseManifest:
        with self._reporting("finalizing an image"):
            return self.buffer.add_close(image_id)

    @contextmanager
    def _reporting(self, what: str) -> Iterator[None]:
        """A refused frame (disk full, bad tile) is the acquisition's error, and also what the
        retained status shows a facility's operators."""
        try:
            yield
        except TilebridgeError as exc:
            self.last_error = f"{what}: {exc}"
            log.error(self.last_error)
            raise
        self.last_error = None  # the acquisition works again

    def wait_done(self, image_ids: list[UUID], timeout: float) -> dict[UUID, ImageAck]:
        """Block until the server acked every image as complete or failed (or timeout)."""
        deadline = time.monotonic() + timeout
        with self._done_cond:
            while not all(i in self._done for i in image_ids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._done_cond.wait(min(remaining, 0.5))
            return {i: self._done[i] for i in image_ids if i in self._done}

    # -- status -----------------------------------------------------------------------------

    def set_backends_source(self, source: BackendsSource | None) -> None:
        """What `status().backends` reports: per-target progress of the current experiment.
        One source at a time; a writer that starts an experiment replaces the previous one."""
        self._backends_source = source

    def status(self, state: Liveness = Liveness.ONLINE) -> DeviceStatus:
        """A snapshot; reading it changes nothing (the throughput is measured by `_report`)."""
        stats = self.buffer.stats()
        inflight_tiles, _ = self.publisher.inflight
        c = self.publisher.counters
        source = self._backends_source
        backends = source() if source is not None else None
        return DeviceStatus(
            at=utcnow(),
            device=self.device,
            state=state,
            buffered_tiles=stats.tiles,
            buffered_bytes=stats.bytes,
            oldest_pending_age_s=stats.oldest_pending_age_s,
            inflight_tiles=inflight_tiles,
            images_pending=stats.images,
            committed_tiles=c.committed_tiles,
            retransmits=c.retransmits,
            rejected_tiles=c.rejected_tiles,
            throughput_bytes_per_s=self._throughput,
            disk_free_bytes=stats.disk_free_bytes,
            current_experiment=self.current_experiment,
            broker_connected=self.connection.connected.is_set(),
            last_error=self.last_error or self.publisher.last_error or self.connection.last_error,
            backends=dict(backends or {}),
        )

    def _connected(self, client: Any) -> None:
        self.publisher.subscribe(client)
        self._publish_status()

    def _publish_status(self) -> None:
        if self.connection.connected.is_set():
            self.connection.publish(self.status_topic, self.status().to_bytes(), retain=True)

    def _report(self) -> None:
        while not self._stop.wait(self.settings.status_interval_s):
            try:
                self._measure_throughput()
                self._publish_status()
                self.buffer.compact()
            except Exception:  # status must never take the agent down
                log.exception("status report")

    def _measure_throughput(self) -> None:
        # Over one status interval, on this thread only: readers of status() share the window.
        now = time.monotonic()
        committed = self.publisher.counters.committed_bytes
        then, before = self._last_committed
        self._throughput = (committed - before) / (now - then) if now > then else 0.0
        self._last_committed = (now, committed)

    def _image_done(self, ack: ImageAck) -> None:
        with self._done_cond:
            self._done[ack.image_id] = ack
            self._done_cond.notify_all()
        self._publish_status()

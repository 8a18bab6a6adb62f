"""Prometheus metrics of the ingest, read from the running service at scrape time.

The collector keeps no counters of its own: every scrape reads the service's stats, ledger
view and storer, so Prometheus and the retained `IngestStatus` cannot disagree. Backend write
latency is the one number no object keeps, so each backend is wrapped once in a timing proxy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server_ingest.ingest import Ingest
from server_ingest.settings import IngestSettings
from server_ingest.staging import Staging
from server_ingest.storer import Storer
from tilebridge_protocol.errors import TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.mqtt import MqttConnection
from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage


class IngestService(Protocol):
    """What the metrics read of the service (its parts, never its internals)."""

    @property
    def settings(self) -> IngestSettings: ...
    @property
    def ingest(self) -> Ingest: ...
    @property
    def storer(self) -> Storer: ...
    @property
    def staging(self) -> Staging: ...
    @property
    def connection(self) -> MqttConnection: ...


T = TypeVar("T")

# Image writes take from milliseconds (a small archive image) to many minutes (OMERO pyramids).
STORE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class IngestCollector(Collector):
    def __init__(self, service: IngestService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        instance = service.settings.instance
        stats = service.ingest.stats

        messages = CounterMetricFamily(
            "tilebridge_ingest_messages",
            "Device messages handled, by kind",
            labels=["instance", "kind"],
        )
        for kind, count in sorted(stats.messages.items()):
            messages.add_metric([instance, kind], count)
        yield messages

        committed = CounterMetricFamily(
            "tilebridge_ingest_tiles_committed",
            "Tiles staged durably and acknowledged to their device",
            labels=["instance"],
        )
        committed.add_metric([instance], stats.tiles_committed)
        yield committed

        rejections = CounterMetricFamily(
            "tilebridge_ingest_rejections",
            "Messages refused, by protocol reason code",
            labels=["instance", "reason"],
        )
        for reason, count in sorted(stats.rejections.items()):
            rejections.add_metric([instance, reason], count)
        yield rejections

        yield _gauge(
            "tilebridge_ingest_images_in_progress",
            "Images receiving or storing",
            instance,
            service.ingest.images_in_progress(),
        )
        yield _gauge(
            "tilebridge_ingest_store_queue",
            "Images queued for or being written to backends",
            instance,
            service.storer.busy(),
        )
        yield _gauge(
            "tilebridge_ingest_staging_bytes",
            "Bytes of tiles staged on the ingest disk",
            instance,
            service.staging.bytes_used(),
        )
        yield _gauge(
            "tilebridge_ingest_broker_connected",
            "1 while connected to the broker",
            instance,
            int(service.connection.connected.is_set()),
        )

        backends = GaugeMetricFamily(
            "tilebridge_ingest_backend_ok",
            "1 if the backend's last write succeeded, 0 if it failed",
            labels=["instance", "backend"],
        )
        for name, state in sorted(service.storer.backend_state.items()):
            backends.add_metric([instance, name], int(state == "ok"))
        yield backends


def _gauge(name: str, doc: str, instance: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc, labels=["instance"])
    gauge.add_metric([instance], value)
    return gauge


class StoreMetrics:
    """What the timing proxies record: one observation per image write attempt."""

    def __init__(self, registry: CollectorRegistry, instance: str) -> None:
        self.instance = instance
        self.seconds = Histogram(
            "tilebridge_ingest_store_seconds",
            "Time to write one image into a backend, from open to durable finish",
            ["instance", "backend", "outcome"],
            registry=registry,
            buckets=STORE_BUCKETS,
        )
        self.retries = Counter(
            "tilebridge_ingest_store_retries",
            "Image writes that failed transiently and will be retried",
            ["instance", "backend"],
            registry=registry,
        )
        self.stored_bytes = Counter(
            "tilebridge_ingest_stored_bytes",
            "Pixel bytes durably written into a backend",
            ["instance", "backend"],
            registry=registry,
        )


class _Attempt:
    """One try at writing one image into one backend: observed once, on its first outcome."""

    def __init__(self, backend: str, metrics: StoreMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.started = time.monotonic()
        self.nbytes = 0
        self.done = False

    def guard(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except TransientError:
            if self._observe("retry"):
                self.metrics.retries.labels(self.metrics.instance, self.backend).inc()
            raise
        except BaseException:
            self._observe("failed")
            raise

    def succeeded(self) -> None:
        if self._observe("ok"):
            self.metrics.stored_bytes.labels(self.metrics.instance, self.backend).inc(self.nbytes)

    def _observe(self, outcome: str) -> bool:
        if self.done:
            return False
        self.done = True
        self.metrics.seconds.labels(self.metrics.instance, self.backend, outcome).observe(
            time.monotonic() - self.started
        )
        return True


class _TimedWriter(ImageWriter):
    def __init__(self, inner: ImageWriter, attempt: _Attempt) -> None:
        super().__init__(inner.device, inner.manifest, inner.backend_name)
        self._inner = inner
        self._attempt = attempt

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        self._attempt.guard(lambda: self._inner.write_tile(key, pixels))
        self._attempt.nbytes += pixels.nbytes

    def finish(self) -> StoredImage:
        stored = self._attempt.guard(self._inner.finish)
        self._attempt.succeeded()
        return stored

    def abort(self) -> None:
        self._inner.abort()


class _TimedBackend(StorageBackend):
    kind = "timed"

    def __init__(self, inner: StorageBackend, metrics: StoreMetrics) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self._metrics = metrics

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        attempt = _Attempt(self.name, self._metrics)
        writer = attempt.guard(lambda: self.inner.open_image(device, manifest))
        return _TimedWriter(writer, attempt)

    def close(self) -> None:
        self.inner.close()


def timed(backend: StorageBackend, metrics: StoreMetrics) -> StorageBackend:
    return _TimedBackend(backend, metrics)


def serve_metrics(service: IngestService, stop: threading.Event) -> None:
    """Serve `/metrics` on `settings.metrics_port` (if set) until `stop` is set."""
    port = service.settings.metrics_port
    if port is None:
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(service))
    store = StoreMetrics(registry, service.settings.instance)
    backends = service.storer.backends
    backends[:] = [b if isinstance(b, _TimedBackend) else timed(b, store) for b in backends]
    httpd, _ = start_http_server(port, registry=registry)

    def shutdown() -> None:
        stop.wait()
        httpd.shutdown()
        httpd.server_close()

    threading.Thread(target=shutdown, name="ingest-metrics-stop", daemon=True).start()

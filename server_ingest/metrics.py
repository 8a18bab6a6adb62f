"""Prometheus metrics of the ingest, read from the core's snapshot at scrape time.

The collector keeps no counters of its own and wraps nothing: every scrape reads the
snapshot the core published (the same one the retained `IngestStatus` is made of), so the
two cannot disagree, and the data path is exactly the same with or without metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server_ingest.state import STORE_BUCKETS, Snapshot
from tilebridge_protocol.reasons import ReasonCode

PRESSURE_LEVELS = {"none": 0, "new_images_refused": 1, "tiles_refused": 2}
FAILURE_REASONS = (ReasonCode.STORAGE_FAILED, ReasonCode.VERIFY_FAILED, ReasonCode.CONFLICT)


class IngestCollector(Collector):
    def __init__(
        self, instance: str, snapshot: Callable[[], Snapshot], connected: Callable[[], bool]
    ) -> None:
        self._instance = instance
        self._snapshot = snapshot
        self._connected = connected

    def collect(self) -> Iterator[Metric]:
        s, instance = self._snapshot(), self._instance
        yield _by(
            "tilebridge_ingest_messages",
            "Device messages handled, by kind",
            "kind",
            instance,
            s.messages,
        )
        committed = CounterMetricFamily(
            "tilebridge_ingest_tiles_committed",
            "Tiles staged durably and acknowledged to their device",
            labels=["instance"],
        )
        committed.add_metric([instance], s.tiles_committed)
        yield committed
        yield _by(
            "tilebridge_ingest_rejections",
            "Messages refused, by protocol reason code",
            "reason",
            instance,
            {str(r): 0 for r in ReasonCode} | dict(s.rejections),  # see FAILURE_REASONS
        )
        yield _gauge(
            "tilebridge_ingest_images_in_progress",
            "Images receiving or storing",
            instance,
            s.images_in_progress,
        )
        yield _gauge(
            "tilebridge_ingest_store_queue",
            "Images being finished in the backends",
            instance,
            s.storing,
        )
        yield _gauge(
            "tilebridge_ingest_staging_bytes",
            "Bytes of tiles staged on the ingest disk",
            instance,
            s.staging_bytes,
        )
        yield _gauge(
            "tilebridge_ingest_broker_connected",
            "1 while connected to the broker",
            instance,
            int(self._connected()),
        )
        backends = GaugeMetricFamily(
            "tilebridge_ingest_backend_ok",
            "1 if the backend's last write succeeded, 0 if it failed",
            labels=["instance", "backend"],
        )
        for name, state in sorted(s.backends.items()):
            backends.add_metric([instance, name], int(state == "ok"))
        yield backends
        seconds = HistogramMetricFamily(
            "tilebridge_ingest_store_seconds",
            "Time to write one image into a backend, from open to durable finish",
            labels=["instance", "backend", "outcome"],
        )
        retries = CounterMetricFamily(
            "tilebridge_ingest_store_retries",
            "Image writes that failed transiently and will be retried",
            labels=["instance", "backend"],
        )
        for (backend, outcome), counts in sorted(s.store_buckets.items()):
            bounds = [*(str(float(b)) for b in STORE_BUCKETS), "+Inf"]
            seconds.add_metric(
                [instance, backend, outcome],
                list(zip(bounds, counts, strict=True)),
                s.store_sums[(backend, outcome)],
            )
            if outcome == "retry":
                retries.add_metric([instance, backend], counts[-1])
        yield seconds
        yield retries
        yield _by(
            "tilebridge_ingest_stored_bytes",
            "Pixel bytes durably written into a backend",
            "backend",
            instance,
            s.stored_bytes,
        )
        yield _by(
            "tilebridge_ingest_images_failed",
            "Images that failed for good (since start), by reason code",
            "reason",
            instance,
            # Every way an image fails has a series from the start: `increase()` cannot see
            # the first failure of a series that appears at 1.
            {str(r): 0 for r in FAILURE_REASONS} | dict(s.failed_total),
        )
        unresolved = GaugeMetricFamily(
            "tilebridge_ingest_images_failed_unresolved",
            "Failed images still staged (not retried or discarded yet), by reason code",
            labels=["instance", "reason"],
        )
        by_reason: dict[str, int] = {str(r): 0 for r in FAILURE_REASONS} | dict(s.unresolved)
        for reason, count in sorted(by_reason.items()):
            unresolved.add_metric([instance, reason], count)
        yield unresolved
        yield _gauge(
            "tilebridge_ingest_images_abandoned",
            "Images their microscope never closed whose tiles are still staged",
            instance,
            sum(1 for h in s.attention if h.phase.value == "expired"),
        )
        waiting = GaugeMetricFamily(
            "tilebridge_ingest_images_waiting",
            "Images whose write into a backend waits for a retry (it is unreachable)",
            labels=["instance", "backend"],
        )
        for name in sorted(s.backends):
            waiting.add_metric([instance, name], s.waiting.get(name, 0))
        yield waiting
        if s.staging_free_bytes is not None:
            yield _gauge(
                "tilebridge_ingest_staging_free_bytes",
                "Free space on the staging disk",
                instance,
                s.staging_free_bytes,
            )
        yield _gauge(
            "tilebridge_ingest_disk_pressure",
            "0: none; 1: new images refused (staging disk low); 2: tiles refused too",
            instance,
            PRESSURE_LEVELS.get(s.disk_pressure, 0),
        )
        yield _by(
            "tilebridge_ingest_retention_removed",
            "Images whose staged tiles the retention policy removed, by the phase they were in",
            "phase",
            instance,
            s.retention_removed,
        )


def _by(
    name: str, doc: str, label: str, instance: str, values: Mapping[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["instance", label])
    for key, value in sorted(values.items()):
        family.add_metric([instance, key], value)
    return family


def _gauge(name: str, doc: str, instance: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc, labels=["instance"])
    gauge.add_metric([instance], value)
    return gauge


class MetricsServer:
    """`/metrics` on `host:port`, from `start()` to `stop()`."""

    def __init__(self, host: str, port: int, collector: IngestCollector) -> None:
        self._host = host
        self._port = port
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._server: object | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._server, _ = start_http_server(self._port, self._host, registry=self._registry)

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None

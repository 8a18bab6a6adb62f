"""Prometheus metrics of the edge agent, read from the running agent at scrape time.

The collector keeps no counters of its own; it reads the disk buffer and the publisher's
counters on every scrape (a Prometheus rate() over the byte counter gives throughput).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.publisher import Publisher
from edge_agent.settings import AgentSettings
from edge_agent.spool import Spool
from tilebridge_runtime.mqtt import MqttConnection


class Observed(Protocol):
    """What the metrics read of the agent (its parts, never its internals)."""

    @property
    def device(self) -> str: ...
    @property
    def settings(self) -> AgentSettings: ...
    @property
    def spool(self) -> Spool: ...
    @property
    def publisher(self) -> Publisher: ...
    @property
    def connection(self) -> MqttConnection: ...


class EdgeCollector(Collector):
    def __init__(self, agent: Observed) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        device = agent.device
        counters = agent.publisher.counters
        buffered = agent.spool.stats()
        inflight_tiles, inflight_bytes = counters.inflight_tiles, counters.inflight_bytes

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["device"])
            family.add_metric([device], value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["device"])
            family.add_metric([device], value)
            return family

        yield counter(
            "tilebridge_edge_committed_tiles",
            "Tiles the server acknowledged as committed",
            counters.committed_tiles,
        )
        yield counter(
            "tilebridge_edge_committed_bytes",
            "Tile bytes the server acknowledged",
            counters.committed_bytes,
        )
        yield counter(
            "tilebridge_edge_retransmits",
            "Tiles sent again (no ack in time or asked to)",
            counters.retransmits,
        )
        yield counter(
            "tilebridge_edge_rejected_tiles",
            "Tiles the server refused for good",
            counters.rejected_tiles,
        )
        yield counter(
            "tilebridge_edge_images_complete",
            "Images the server reported stored",
            counters.images_complete,
        )
        yield gauge(
            "tilebridge_edge_buffered_tiles",
            "Tiles on the local disk not yet committed",
            buffered.tiles,
        )
        yield gauge(
            "tilebridge_edge_buffered_bytes", "Bytes of tiles not yet committed", buffered.bytes
        )
        yield gauge(
            "tilebridge_edge_oldest_pending_age_seconds",
            "Age of the oldest queued item; 0 when nothing is pending",
            buffered.oldest_pending_age_s or 0.0,
        )
        yield gauge(
            "tilebridge_edge_images_pending",
            "Images with data still in the buffer",
            buffered.images,
        )
        yield gauge(
            "tilebridge_edge_inflight_tiles", "Tiles published, awaiting their ack", inflight_tiles
        )
        yield gauge(
            "tilebridge_edge_inflight_bytes", "Bytes published, awaiting their ack", inflight_bytes
        )
        yield gauge(
            "tilebridge_edge_disk_free_bytes",
            "Free bytes on the buffer's disk",
            buffered.disk_free_bytes,
        )
        yield gauge(
            "tilebridge_edge_broker_connected",
            "1 while connected to the broker",
            int(agent.connection.connected.is_set()),
        )


def serve_metrics(agent: Observed, stop: threading.Event) -> None:
    """Serve `/metrics` on `settings.metrics_port` (if set) until `stop` is set."""
    port = agent.settings.metrics_port
    if port is None:
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(agent))
    httpd, _ = start_http_server(port, agent.settings.metrics_host, registry=registry)

    def shutdown() -> None:
        stop.wait()
        httpd.shutdown()
        httpd.server_close()

    threading.Thread(target=shutdown, name="edge-metrics-stop", daemon=True).start()

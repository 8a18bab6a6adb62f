"""The Prometheus endpoints of the ingest and the edge agent, scraped during a real scan."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from devtools.broker import free_port
from devtools.stack import wait_for
from edge_agent.app import EdgeApp
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tests.dashboard.stack import DEVICE, running_stack, scan
from tilebridge_protocol.errors import TransientError
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_runtime.mqtt import BrokerSettings
from tilebridge_storage.base import ImageWriter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

INGEST_METRICS = {
    "tilebridge_ingest_messages_total",
    "tilebridge_ingest_tiles_committed_total",
    "tilebridge_ingest_rejections_total",
    "tilebridge_ingest_images_in_progress",
    "tilebridge_ingest_store_queue",
    "tilebridge_ingest_staging_bytes",
    "tilebridge_ingest_broker_connected",
    "tilebridge_ingest_backend_ok",
    "tilebridge_ingest_store_seconds_bucket",
    "tilebridge_ingest_store_seconds_count",
    "tilebridge_ingest_store_retries_total",
    "tilebridge_ingest_stored_bytes_total",
}
EDGE_METRICS = {
    "tilebridge_edge_committed_tiles_total",
    "tilebridge_edge_committed_bytes_total",
    "tilebridge_edge_retransmits_total",
    "tilebridge_edge_rejected_tiles_total",
    "tilebridge_edge_images_complete_total",
    "tilebridge_edge_buffered_tiles",
    "tilebridge_edge_buffered_bytes",
    "tilebridge_edge_oldest_pending_age_seconds",
    "tilebridge_edge_images_pending",
    "tilebridge_edge_inflight_tiles",
    "tilebridge_edge_inflight_bytes",
    "tilebridge_edge_disk_free_bytes",
    "tilebridge_edge_broker_connected",
}


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def fail_once(inner: Any) -> Callable[[str, OpenManifest], ImageWriter]:
    """The backend's first write attempt finds it unreachable (e.g. OMERO restarting)."""
    original = inner.open_image
    calls = []

    def open_image(device: str, manifest: OpenManifest) -> ImageWriter:
        calls.append(manifest.image_id)
        if len(calls) == 1:
            raise TransientError("archive volume not mounted (injected)")
        writer: ImageWriter = original(device, manifest)
        return writer

    return open_image


def test_metrics_move_during_a_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ingest_port, edge_port = free_port(), free_port()
    with running_stack(
        tmp_path, ingest_metrics=ingest_port, agent_metrics=edge_port, store_retry_s=0.2
    ) as stack:
        before_ingest, before_edge = scrape(ingest_port), scrape(edge_port)
        assert INGEST_METRICS - {
            "tilebridge_ingest_messages_total",
            "tilebridge_ingest_rejections_total",
            "tilebridge_ingest_store_seconds_bucket",
            "tilebridge_ingest_store_seconds_count",
            "tilebridge_ingest_store_retries_total",
            "tilebridge_ingest_stored_bytes_total",
        } <= names(before_ingest)
        assert names(before_edge) >= EDGE_METRICS
        assert value(before_ingest, "tilebridge_ingest_broker_connected", instance="ingest-1") == 1
        assert value(before_edge, "tilebridge_edge_committed_tiles_total", device=DEVICE) == 0

        (backend,) = stack.ingest.storer.backends
        assert backend.name == "archive"
        monkeypatch.setattr(backend, "open_image", fail_once(backend))

        simulated = SyntheticScan(columns=3, rows=2, tile_size=256, seed=5)
        image_id = scan(stack.agent, simulated)
        assert stack.agent.acquisition.wait_done(image_id, 60).server == "complete"
        # A message the ingest must refuse: not a tile chunk at all.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", stack.broker.port)
        client.loop_start()
        client.publish(device_topic(DEVICE, DeviceTopic.CHUNK), b"garbage", qos=1).wait_for_publish(
            10
        )
        client.disconnect()
        client.loop_stop()
        wait_for(
            lambda: value(
                scrape(ingest_port),
                "tilebridge_ingest_rejections_total",
                instance="ingest-1",
                reason="malformed",
            ),
            30,
            "the rejection to be counted",
        )

        ingest, edge = scrape(ingest_port), scrape(edge_port)
        assert names(ingest) >= INGEST_METRICS
        tiles, tile_bytes = 6, 256 * 256 * 2
        assert (
            value(ingest, "tilebridge_ingest_tiles_committed_total", instance="ingest-1") == tiles
        )
        assert (
            value(ingest, "tilebridge_ingest_messages_total", instance="ingest-1", kind="chunk")
            >= tiles
        )
        assert value(ingest, "tilebridge_ingest_images_in_progress", instance="ingest-1") == 0
        assert (
            value(
                ingest,
                "tilebridge_ingest_store_retries_total",
                instance="ingest-1",
                backend="archive",
            )
            == 1
        )
        stored = {"instance": "ingest-1", "backend": "archive"}
        assert (
            value(ingest, "tilebridge_ingest_store_seconds_count", **stored, outcome="retry") == 1
        )
        assert value(ingest, "tilebridge_ingest_store_seconds_count", **stored, outcome="ok") == 1
        assert value(ingest, "tilebridge_ingest_store_seconds_sum", **stored, outcome="ok") > 0
        assert value(ingest, "tilebridge_ingest_stored_bytes_total", **stored) == tiles * tile_bytes
        assert value(ingest, "tilebridge_ingest_backend_ok", **stored) == 1

        assert value(edge, "tilebridge_edge_committed_tiles_total", device=DEVICE) == tiles
        assert (
            value(edge, "tilebridge_edge_committed_bytes_total", device=DEVICE)
            == tiles * tile_bytes
        )
        assert value(edge, "tilebridge_edge_images_complete_total", device=DEVICE) == 1
        assert value(edge, "tilebridge_edge_buffered_tiles", device=DEVICE) == 0
        assert value(edge, "tilebridge_edge_broker_connected", device=DEVICE) == 1
        assert value(edge, "tilebridge_edge_disk_free_bytes", device=DEVICE) > 0

    # The endpoints end with their services.
    wait_for(
        lambda: not listening(ingest_port) and not listening(edge_port), 10, "endpoints to close"
    )


def test_edge_metrics_show_the_backlog_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    nowhere = BrokerSettings(port=free_port())  # nothing listens there
    settings = AgentSettings(
        device_id=DEVICE,
        broker=nowhere,
        spool_dir=tmp_path / "spool",
        min_free_bytes=0,
        metrics_port=port,
    )
    with EdgeApp(settings) as agent:
        scan(agent, SyntheticScan(columns=2, rows=2, tile_size=128, seed=1))
        samples = scrape(port)
        assert value(samples, "tilebridge_edge_buffered_tiles", device=DEVICE) == 4
        assert value(samples, "tilebridge_edge_buffered_bytes", device=DEVICE) == 4 * 128 * 128 * 2
        assert value(samples, "tilebridge_edge_images_pending", device=DEVICE) == 1
        assert value(samples, "tilebridge_edge_broker_connected", device=DEVICE) == 0
        assert value(samples, "tilebridge_edge_committed_tiles_total", device=DEVICE) == 0
        wait_for(
            lambda: (
                value(scrape(port), "tilebridge_edge_oldest_pending_age_seconds", device=DEVICE) > 0
            ),
            10,
            "the oldest pending item to age",
        )


def test_no_endpoint_without_a_port(tmp_path: Path) -> None:
    with running_stack(tmp_path) as stack:
        assert stack.ingest.metrics is None

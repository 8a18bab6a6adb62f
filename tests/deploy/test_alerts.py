"""The alert rules of deploy/prometheus/tilebridge-alerts.yml, evaluated by a real Prometheus
(Debian's) that scrapes the real metrics endpoint of an ingest while a failure of each kind
happens to it; and the alerts resolve when the failure is resolved."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from devtools.broker import free_port
from devtools.prometheus import Prometheus
from server_ingest.metrics import IngestCollector, MetricsServer
from tests.ingest.harness import DEVICE, Harness, tiles_for
from tests.ingest.test_images_admin import Ingest, fail_in_the_archive, fix
from tilebridge_protocol.messages import ImageState
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.testing.manifests import make_manifest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "tilebridge-alerts.yml"


def test_the_rules_load() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


@contextmanager
def watched(
    tmp_path: Path, harness: Harness, connected: Callable[[], bool] = lambda: True
) -> Iterator[Prometheus]:
    """The harness's metrics served as the ingest serves them, scraped by Prometheus."""
    port = free_port()
    collector = IngestCollector("ingest-1", harness.engine.snapshot, connected)
    metrics = MetricsServer("127.0.0.1", port, collector)
    metrics.start()
    try:
        with Prometheus(
            tmp_path / "prometheus", RULES, {"tilebridge-ingest": [f"127.0.0.1:{port}"]}
        ) as prometheus:
            yield prometheus
    finally:
        metrics.stop()


def test_a_permanent_storage_failure_alerts_until_it_is_retried(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ingest = Ingest(tmp_path)
    try:
        with watched(tmp_path, ingest.harness) as prometheus:
            manifest, _, ack = fail_in_the_archive(ingest)
            assert ack.state is ImageState.FAILED
            failed = prometheus.wait_firing("TilebridgeImageFailed", reason="storage_failed")
            assert failed["severity"] == "critical" and failed["instance"]
            prometheus.wait_firing("TilebridgeBackendFailing", backend="archive")
            assert set(prometheus.firing()) == {"TilebridgeImageFailed", "TilebridgeBackendFailing"}

            fix(tmp_path / "archive")
            code, _, err = ingest.admin(capsys, "retry", str(manifest.image_id), "--wait", "30")
            assert code == 0, err
            prometheus.wait_resolved("TilebridgeImageFailed")
            prometheus.wait_resolved("TilebridgeBackendFailing")
            assert prometheus.firing() == {}
    finally:
        ingest.close()
        fix(tmp_path / "archive")


def test_an_abandoned_image_alerts(tmp_path: Path) -> None:
    from server_ingest.settings import Limits

    harness = Harness(tmp_path, Limits(image_ttl_s=1.0))
    try:
        with watched(tmp_path, harness) as prometheus:
            manifest = make_manifest(rows=1, columns=2)
            tiles = tiles_for(manifest)
            harness.send(DeviceTopic.OPEN, manifest.to_bytes())
            from tests.ingest.harness import chunks

            first = manifest.tile_keys()[0]
            for message in chunks(manifest, first, tiles[first]):
                harness.send(DeviceTopic.CHUNK, message)
            # ...and the microscope never sends the rest nor the close.
            prometheus.wait_firing("TilebridgeImageAbandoned")
            assert harness.phase(manifest.image_id)[0] == "expired"
    finally:
        harness.close()


def test_a_bug_on_a_message_and_a_lost_broker_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(tmp_path)
    connected = [True]
    try:
        with watched(tmp_path, harness, lambda: connected[0]) as prometheus:
            prometheus.wait_resolved("TilebridgeIngestMessageBugs")  # scraped at 0 first
            _scraped(prometheus)
            monkeypatch.setattr(harness.engine.core.intake, "_open", lambda *_: {}["bug"])
            harness.send(DeviceTopic.OPEN, b'{"v": 1}', device=DEVICE)
            prometheus.wait_firing("TilebridgeIngestMessageBugs")
            connected[0] = False
            prometheus.wait_firing("TilebridgeIngestBrokerDisconnected")
    finally:
        harness.close()


def _scraped(prometheus: Prometheus, timeout: float = 30) -> Any:
    """Wait until Prometheus holds a sample of the ingest (so a counter has its 0 first)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = prometheus._get("/api/v1/query?query=tilebridge_ingest_tiles_committed_total")
        if result["data"]["result"]:
            time.sleep(2.5)  # a second sample at 0, so increase() sees the step
            return result
        time.sleep(0.3)
    raise TimeoutError("never scraped")


def test_a_verification_failure_alerts_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.storage.test_archive import _corrupting
    from tilebridge_storage import archive

    monkeypatch.setattr(archive, "atomic_write", _corrupting([1000]))
    harness = Harness(tmp_path, verify_attempts=1)
    try:
        with watched(tmp_path, harness) as prometheus:
            manifest = make_manifest(rows=1, columns=2)
            harness.scan(manifest, tiles_for(manifest))
            assert harness.recorder.wait_image_ack(manifest.image_id).state is ImageState.FAILED
            prometheus.wait_firing("TilebridgeImageFailed", reason="verify_failed")
            prometheus.wait_firing("TilebridgeBackendFailing", backend="archive")
    finally:
        harness.close()


def test_an_unreachable_backend_and_a_low_disk_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server_ingest.retention import free_bytes
    from server_ingest.settings import Retention
    from tilebridge_protocol.errors import TransientError
    from tilebridge_storage import archive

    def unreachable(*_: object) -> None:
        raise TransientError("archive volume not mounted (it comes back)")

    monkeypatch.setattr(archive._ArchiveWriter, "finish", unreachable)
    low = Retention(reserve_bytes=free_bytes(tmp_path) + 2**40, floor_bytes=0)
    harness = Harness(tmp_path, retention=low)
    try:
        with watched(tmp_path, harness) as prometheus:
            prometheus.wait_firing("TilebridgeStagingDiskPressure")
        harness.close()
        harness = Harness(tmp_path)
        with watched(tmp_path / "2", harness) as prometheus:
            manifest = make_manifest(rows=1, columns=2)
            harness.scan(manifest, tiles_for(manifest))
            prometheus.wait_firing("TilebridgeBackendWaiting", backend="archive")
            prometheus.wait_firing("TilebridgeBackendFailing", backend="archive")
            assert "TilebridgeImageFailed" not in prometheus.firing()  # delayed, not failed
    finally:
        harness.close()

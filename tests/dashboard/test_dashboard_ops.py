"""The dashboard in Chromium for issue 13, against a real broker, ingest and agent:

* a microscope revoked at the broker (dropped without its last will) turns offline once it
  is silent, and `server-ingest device remove` clears it from the dashboard;
* the live mosaic preview's pixels equal a downsampling of the tiles committed so far, and
  a stored image shows its archive path.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import Mosquitto, free_port
from devtools.stack import wait_for
from edge_agent.app import EdgeApp
from edge_agent.settings import AgentSettings
from server_ingest.__main__ import main
from server_ingest.app import IngestService
from server_ingest.dashboard.server import DashboardServer
from server_ingest.dashboard.settings import DashboardSettings
from server_ingest.settings import IngestSettings, Preview
from tests.dashboard import test_dashboard_browser as browser
from tests.dashboard.stack import release
from tests.ingest.harness import chunks, close_for, tiles_for
from tests.ingest.test_preview import expected
from tilebridge_protocol.messages import TileAck, TileState, decode_ack
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_runtime.mqtt import BrokerSettings
from tilebridge_storage.mosaic import plan
from tilebridge_storage.testing.manifests import make_manifest

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = browser.pytestmark
page = browser.page  # the Chromium page fixture
shoot = browser.shoot

PASSWORDS = {"ingest": "ingest-pw", "monitor": "monitor-pw", "scope-7": "s7-pw", "scope-8": "s8-pw"}


def broker_as(broker: Mosquitto, name: str) -> BrokerSettings:
    return BrokerSettings(port=broker.port, username=name, password=PASSWORDS[name])


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto.secured(tmp_path / "broker", PASSWORDS) as broker:
        yield broker


def agent(broker: Mosquitto, device: str, root: Path) -> EdgeApp:
    return EdgeApp(
        AgentSettings(
            device_id=device,
            broker=broker_as(broker, device),
            spool_dir=root / f"spool-{device}",
            min_free_bytes=0,
            status_interval_s=0.5,
        )
    ).start()


def test_a_revoked_microscope_turns_offline_and_device_remove_clears_it(
    tmp_path: Path, secured: Mosquitto, page: Any
) -> None:
    data = tmp_path / "ingest"
    settings = IngestSettings(
        broker=broker_as(secured, "ingest"), data_dir=data, status_interval_s=0.5
    )
    ingest = IngestService(settings).start()
    agents = [agent(secured, "scope-7", tmp_path), agent(secured, "scope-8", tmp_path)]
    board = DashboardSettings(
        broker=broker_as(secured, "monitor"), listen_port=free_port(), device_stale_s=3.0
    )
    config = tmp_path / "ingest.json"
    config.write_text(json.dumps({"data_dir": str(data)}))
    try:
        with DashboardServer(board) as dashboard:
            page.goto(dashboard.url)
            for name in ("scope-7", "scope-8"):
                card = page.locator(f'[data-device="{name}"]')
                card.locator(".badge", has_text="online").wait_for(timeout=30_000)
            chart = page.locator('[data-device="scope-7"] svg.throughput polyline')
            chart.wait_for(state="attached", timeout=30_000)  # a flat line has no height
            assert len(chart.get_attribute("points").split()) >= 2  # type: ignore[union-attr]

            # Revoked at the broker (the password file edited, the broker reloaded): it is
            # dropped without its will, so its retained status still says online...
            secured.remove_identity("scope-7")
            revoked = page.locator('[data-device="scope-7"][data-stale]')
            revoked.wait_for(timeout=30_000)  # ...and the dashboard shows it offline
            assert revoked.locator(".badge").inner_text().lower() == "offline"
            assert "Microscope scope-7 is offline" in page.locator("#attention").inner_text()
            assert page.locator('[data-device="scope-8"] .badge').inner_text().lower() == "online"
            shoot(page, "dashboard-revoked")

            # `device remove` revokes scope-8 and the ingest clears its retained status.
            code = main([
                "--config", str(config), "device", "remove", "scope-8",
                "--password-file", str(secured.password_path), "--acl", str(secured.acl_path),
                "--pid", str(secured.proc.pid),  # type: ignore[union-attr]
            ])  # fmt: skip
            assert code == 0
            page.locator('[data-device="scope-8"]').wait_for(state="detached", timeout=30_000)
            health = page.request.get(f"{dashboard.url}/healthz")
            assert health.status == 200 and health.json()["ok"] is True
        release(dashboard.monitor.connection)
    finally:
        for a in agents:
            a.stop()
            release(a.connection)
        ingest.stop()
        release(ingest.connection)


def test_healthz_says_when_the_dashboard_cannot_log_in(tmp_path: Path, secured: Mosquitto) -> None:
    import httpx

    wrong = BrokerSettings(port=secured.port, username="monitor", password="not-the-password")
    with DashboardServer(DashboardSettings(broker=wrong, listen_port=free_port())) as dashboard:
        time.sleep(1.5)
        response = httpx.get(f"{dashboard.url}/healthz", timeout=10)
        assert response.status_code == 503 and response.json()["ok"] is False
    release(dashboard.monitor.connection)


class Device:
    """A microscope speaking the wire protocol itself: sends exactly the tiles a test names
    and waits for their commit acks."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.committed: set[Any] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(device_topic(name, DeviceTopic.ACK), qos=1)
        self.client.loop_start()

    def _message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ack = decode_ack(msg.payload)
        if isinstance(ack, TileAck) and ack.state is TileState.COMMITTED:
            with self._lock:
                self.committed.add(ack.tile)

    def send(self, kind: DeviceTopic, payload: bytes) -> None:
        self.client.publish(device_topic(self.name, kind), payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def preview_pixels(page: Any, selector: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The preview image's grey and alpha as the browser decoded it (via a canvas)."""
    data = page.evaluate(
        """s => { const img = document.querySelector(s);
                  const c = document.createElement('canvas');
                  c.width = img.naturalWidth; c.height = img.naturalHeight;
                  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                  const d = g.getImageData(0, 0, c.width, c.height).data;
                  return {w: c.width, h: c.height, px: Array.from(d)}; }""",
        selector,
    )
    rgba = np.array(data["px"], np.uint8).reshape(data["h"], data["w"], 4)
    return rgba[..., 0], rgba[..., 3]


def downsampled(manifest: Any, committed: dict[int, Any], factor: int) -> Any:
    """What the preview must show: block means of the committed tiles, stretched to 0..255."""
    means = expected(manifest, committed, factor)
    shown = ~np.isnan(means)
    lo, hi = means[shown].min(), means[shown].max()
    grey = np.where(shown, np.rint((np.nan_to_num(means) - lo) * 255 / (hi - lo)), 0)
    return grey.astype(np.uint8), shown


def test_the_live_preview_shows_a_downsampling_of_the_committed_tiles(
    tmp_path: Path, page: Any
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        settings = IngestSettings(
            broker=BrokerSettings(port=broker.port),
            data_dir=tmp_path / "ingest",
            status_interval_s=0.5,
            preview=Preview(max_px=64, interval_s=0.2),
        )
        ingest = IngestService(settings).start()
        device = Device(broker.port, "scope-9")
        board = DashboardSettings(broker=BrokerSettings(port=broker.port), listen_port=free_port())
        try:
            with DashboardServer(board) as dashboard:
                page.goto(dashboard.url)
                page.locator("#connection", has_text="live").wait_for(timeout=30_000)
                m = make_manifest(
                    rows=3, columns=3, tile=(80, 96), overlap=0.1, size_z=1, size_c=1,
                    channels=["DAPI"], experiment="plate-9", image_name="well-C4",
                )  # fmt: skip
                tiles = tiles_for(m, seed=3)
                keys = m.tile_keys()
                # 269 x 224 canvas pixels into at most 64: 8 x 8 blocks (the level's rule).
                assert (plan(m).width, plan(m).height) == (269, 224)
                device.send(DeviceTopic.OPEN, m.to_bytes())
                first = [keys[i] for i in (0, 1, 4, 8)]
                for key in first:
                    for message in chunks(m, key, tiles[key], 4096):
                        device.send(DeviceTopic.CHUNK, message)
                wait_for(lambda: device.committed >= set(first), 30, "4 tiles committed")
                img = f'#running [data-image="{m.image_id}"] img.preview'
                check(page, img, m, {k.index: tiles[k] for k in first}, factor=8)
                shoot(page, "dashboard-preview")

                for key in keys:
                    if key not in first:
                        for message in chunks(m, key, tiles[key], 4096):
                            device.send(DeviceTopic.CHUNK, message)
                device.send(DeviceTopic.CLOSE, close_for(m, tiles).to_bytes())
                done = f'#recent [data-image="{m.image_id}"][data-phase="complete"]'
                page.locator(done).wait_for(timeout=60_000)
                check(page, f"{done} img.preview", m, {k.index: tiles[k] for k in keys}, 8)
                archive = page.locator(f"{done} [data-archive]").inner_text()
                assert archive.startswith(str(tmp_path / "ingest" / "archive"))
                assert Path(archive).exists()
            release(dashboard.monitor.connection)
        finally:
            device.close()
            ingest.stop()
            release(ingest.connection)


def check(page: Any, selector: str, manifest: Any, committed: dict[int, Any], factor: int) -> None:
    want_grey, want_shown = downsampled(manifest, committed, factor)

    def matches() -> bool:
        try:
            page.wait_for_function(
                "s => { const i = document.querySelector(s); return i && i.complete && "
                "i.naturalWidth > 0; }",
                arg=selector,
                timeout=5_000,
            )
            grey, alpha = preview_pixels(page, selector)
        except Exception:  # the card re-rendered between finding and reading it
            return False
        if grey.shape != want_grey.shape or not ((alpha == 255) == want_shown).all():
            return False
        return bool(np.abs(grey.astype(int) - want_grey)[want_shown].max() <= 1)

    wait_for(matches, 30, f"the preview of {UUID(str(manifest.image_id))} to match")


def test_a_failed_image_is_listed_with_its_disk_use_and_the_command_until_retried(
    tmp_path: Path, page: Any
) -> None:
    import httpx

    from tests.ingest.test_images_admin import break_, fix

    archive = tmp_path / "archive"
    break_(archive)
    try:
        with Mosquitto(tmp_path / "broker") as broker:
            metrics = free_port()
            settings = IngestSettings(
                broker=BrokerSettings(port=broker.port), data_dir=tmp_path / "ingest",
                archive_dir=archive, status_interval_s=0.5, metrics_port=metrics,
            )  # fmt: skip
            ingest = IngestService(settings).start()
            device = Device(broker.port, "scope-9")
            board = DashboardSettings(
                broker=BrokerSettings(port=broker.port), listen_port=free_port()
            )
            config = tmp_path / "ingest.json"
            config.write_text(settings.model_dump_json())
            try:
                with DashboardServer(board) as dashboard:
                    page.goto(dashboard.url)
                    m = make_manifest(rows=1, columns=2, size_z=1, size_c=1, channels=["A"])
                    tiles = tiles_for(m)
                    device.send(DeviceTopic.OPEN, m.to_bytes())
                    for key, pixels in tiles.items():
                        for message in chunks(m, key, pixels):
                            device.send(DeviceTopic.CHUNK, message)
                    device.send(DeviceTopic.CLOSE, close_for(m, tiles).to_bytes())
                    row = page.locator(f'#held [data-held="{m.image_id}"]')
                    row.wait_for(timeout=30_000)
                    text = row.inner_text()
                    assert "storage_failed" in text and str(archive) in text
                    assert f"{m.tile_count * m.tile_bytes / 1024:.1f} KiB" in text
                    command = row.locator("code.command").inner_text()
                    assert command == f"server-ingest images retry scope-9/{m.image_id}"
                    target = page.locator('[data-ingest] [data-target="archive"]')
                    assert "failing" in target.inner_text().lower()
                    scraped = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
                    assert (
                        'tilebridge_ingest_images_failed_unresolved{instance="ingest-1",'
                        'reason="storage_failed"} 1.0' in scraped
                    )
                    shoot(page, "dashboard-failed-image")

                    fix(archive)
                    args = command.split()[1:]  # the command as shown, with our config
                    assert main(["--config", str(config), *args, "--wait", "30"]) == 0
                    row.wait_for(state="detached", timeout=30_000)
                    done = page.locator(
                        f'#recent [data-image="{m.image_id}"][data-phase="complete"]'
                    )
                    done.wait_for(timeout=30_000)
                release(dashboard.monitor.connection)
            finally:
                device.close()
                ingest.stop()
                release(ingest.connection)
    finally:
        fix(archive)

"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against a
real Mosquitto while a simulated scan runs through a real ingest and edge agent.

Screenshots land in artifacts/screenshots/ for a person to look at.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import free_port
from devtools.stack import wait_for
from edge_agent.simulate import SyntheticScan
from server_ingest.dashboard.server import DashboardServer
from server_ingest.dashboard.settings import DashboardSettings
from tests.dashboard.stack import DEVICE, release, running_stack, scan
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import ImagePhase, ImageStatus
from tilebridge_protocol.topics import image_status_topic
from tilebridge_runtime.mqtt import BrokerSettings

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
OMERO_WEB = "https://omero.example.org"
# Chromium must never reach out on its own (updates, sync, QUIC probes): only our loopback page.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="apt-get install chromium"),
]


@pytest.fixture
def page(tmp_path: Path) -> Iterator[sync_api.Page]:
    with sync_api.sync_playwright() as playwright:
        # A persistent context is how Playwright takes a fresh --user-data-dir of our choosing.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 900},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def inject(port: int, status: ImageStatus) -> None:
    """Publish a retained image status as the ingest would (a failure we cannot easily cause)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(
            image_status_topic(status.device, status.image_id),
            status.to_bytes(),
            qos=1,
            retain=True,
        )
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def image_status(image_id: UUID, phase: ImagePhase, **fields: object) -> ImageStatus:
    values: dict[str, object] = dict(
        at=utcnow(),
        device=DEVICE,
        image_id=image_id,
        experiment="plate-42",
        image_name="well-B3",
        phase=phase,
        tiles_total=12,
        tiles_received=12,
        tiles_committed=12,
        tiles_stored=0,
    )
    values.update(fields)
    return ImageStatus.model_validate(values)


def shoot(page: sync_api.Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_dashboard_shows_a_live_scan_and_a_failure(tmp_path: Path, page: sync_api.Page) -> None:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))

    with running_stack(tmp_path) as stack:
        settings = DashboardSettings(
            broker=BrokerSettings(port=stack.broker.port),
            listen_port=free_port(),
            omero_web_url=OMERO_WEB,
        )
        with DashboardServer(settings) as dashboard:
            page.goto(dashboard.url)
            device = page.locator(f'[data-device="{DEVICE}"]')
            device.locator(".badge", has_text="online").wait_for(timeout=30_000)
            # The board may render from its first snapshot before the event stream is open.
            page.locator("#connection", has_text="live").wait_for(timeout=30_000)
            assert page.locator("#connection").inner_text() == "live"

            # A scan slow enough to be watched while it runs.
            simulated = SyntheticScan(
                columns=4,
                rows=3,
                tile_size=256,
                seed=11,
                experiment="plate-42",
                image_name="well-A1",
            )
            image_id = simulated.manifest().image_id
            acquisition = threading.Thread(
                target=scan, args=(stack.agent, simulated, 0.3), name="acquisition"
            )
            acquisition.start()
            running = page.locator(f'#running [data-image="{image_id}"]')
            running.wait_for(timeout=30_000)
            committed = f'#running [data-image="{image_id}"] [data-bar="committed"] .bar-percent'
            wait_for(lambda: 0 < _percent(page, committed) < 100, 30, "a partly committed image")
            assert "well-A1" in running.inner_text()
            shoot(page, "dashboard-scanning")
            acquisition.join(timeout=60)

            finished = page.locator(f'#recent [data-image="{image_id}"][data-phase="complete"]')
            finished.wait_for(timeout=60_000)
            assert finished.locator('[data-bar="stored"] .bar-percent').inner_text() == "100 %"
            assert finished.locator('[data-bar="stored"] .bar-value').inner_text() == "12 / 12"
            assert page.locator(f'#running [data-image="{image_id}"]').count() == 0
            committed_on_device = device.locator(".fact", has_text="Committed")
            wait_for(lambda: "12 tiles" in committed_on_device.inner_text(), 30, "12 committed")

            # An image stored in OMERO links to OMERO.web; a failed one is highlighted.
            in_omero, failed = uuid4(), uuid4()
            inject(
                stack.broker.port,
                image_status(
                    in_omero,
                    ImagePhase.COMPLETE,
                    image_name="well-B2",
                    tiles_stored=12,
                    locations={"omero": "omero:Image:4711", "archive": "/srv/archive/x"},
                ),
            )
            error = "storage_failed: OMERO refused the image: disk quota exceeded"
            inject(stack.broker.port, image_status(failed, ImagePhase.FAILED, error=error))
            link = page.locator(f'[data-image="{in_omero}"] a.omero')
            link.wait_for(timeout=30_000)
            assert link.get_attribute("href") == f"{OMERO_WEB}/webclient/?show=image-4711"
            bad = page.locator(f'[data-image="{failed}"]')
            bad.wait_for(timeout=30_000)
            assert "has-error" in (bad.get_attribute("class") or "")
            assert bad.locator("[data-error]").inner_text() == error
            alerts = page.locator("#attention")
            assert alerts.is_visible()
            assert error in alerts.inner_text()
            # Red, not just a class name: the operator has to see it. (Read with retries: a
            # status message may re-render the card between finding and reading it.)
            red = "rgb(255, 235, 233)"
            error_box = f'[data-image="{failed}"] [data-error]'
            wait_for(lambda: background(page, error_box) == red, 10, "a red error box")
            assert page.locator(f'[data-image="{image_id}"] a.omero').count() == 0
            shoot(page, "dashboard-failure")

            # The device going away shows up without a reload.
            stack.agent.stop()
            device.locator(".badge", has_text="offline").wait_for(timeout=30_000)
            idle = page.locator("[data-ingest] .fact", has_text="Images in progress")
            wait_for(lambda: idle.inner_text().split()[-1] == "0", 30, "the ingest to be idle")
            assert f"Microscope {DEVICE} is offline" in alerts.inner_text()
            shoot(page, "dashboard-offline")
        release(dashboard.monitor.connection)

    assert not problems, problems


def background(page: sync_api.Page, selector: str) -> str | None:
    script = (
        "s => { const e = document.querySelector(s); "
        "return e && getComputedStyle(e).backgroundColor; }"
    )
    result = page.evaluate(script, selector)
    return str(result) if result else None


def _percent(page: sync_api.Page, selector: str) -> int:
    # Read in one step: the card leaves "running" when the image completes.
    text = page.evaluate("s => document.querySelector(s)?.textContent ?? null", selector)
    return int(text.rstrip(" %")) if text else 0

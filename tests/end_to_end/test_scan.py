"""A simulated scan through a real Mosquitto, with the programs an admin installs, while
the parts fail: every tile must arrive, exactly as acquired, and be stored once."""

from __future__ import annotations

from pathlib import Path

from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, wait_for
from tests.end_to_end.conftest import (
    SCAN,
    assert_archive_intact,
    image_status,
    ledger_tile_rows,
    start_ingest,
    start_scan,
    wait_committed,
)

IMAGE = SCAN.manifest().image_id
TOTAL = SCAN.manifest().tile_count
DEVICE_STATUS = "tilebridge/v1/dev/scope-1/status"
INGEST_STATUS = "tilebridge/v1/ingest/ingest-1/status"


def _finish(agent: Program, watcher: Watcher, tmp_path: Path) -> None:
    assert agent.wait(timeout=120) == 0, agent.log_tail()
    assert_archive_intact(tmp_path)
    assert ledger_tile_rows(tmp_path, IMAGE) == TOTAL
    wait_for(lambda: image_status(watcher, IMAGE).get("phase") == "complete", 20, "complete status")
    status = image_status(watcher, IMAGE)
    assert status["tiles_committed"] == status["tiles_stored"] == status["tiles_total"] == TOTAL
    assert status["locations"]["archive"].endswith(".ome.tif")


def test_a_scan_arrives_intact(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path
) -> None:
    start_ingest(programs, broker, tmp_path)
    agent = start_scan(programs, broker, tmp_path)
    _finish(agent, watcher, tmp_path)
    device = wait_for(lambda: watcher.latest(DEVICE_STATUS), 10, "device status")
    assert device["device"] == "scope-1"


def test_ingest_down_mid_scan_the_agent_buffers_then_everything_arrives_once(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path
) -> None:
    ingest = start_ingest(programs, broker, tmp_path)
    agent = start_scan(programs, broker, tmp_path, "--frame-delay", "0.2")
    wait_committed(watcher, IMAGE, 3)
    ingest.kill()
    wait_for(
        lambda: (watcher.latest(INGEST_STATUS) or {}).get("state") == "offline", 30, "last will"
    )
    # The acquisition goes on into the disk buffer while nobody acknowledges anything.
    wait_for(
        lambda: (watcher.latest(DEVICE_STATUS) or {}).get("buffered_tiles", 0) >= 5,
        60,
        "the agent buffering while the ingest is down",
    )
    assert agent.running
    start_ingest(programs, broker, tmp_path)
    _finish(agent, watcher, tmp_path)


def test_broker_killed_and_restarted_mid_scan(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path
) -> None:
    start_ingest(programs, broker, tmp_path)
    agent = start_scan(programs, broker, tmp_path, "--frame-delay", "0.2")
    wait_committed(watcher, IMAGE, 3)
    watcher.close()
    broker.kill()  # no chance to save its in-memory queues
    broker.start()
    watcher.__init__(broker, "tilebridge/v1/image/+/+/status", DEVICE_STATUS)  # type: ignore[misc]
    _finish(agent, watcher, tmp_path)


def test_agent_killed_mid_scan_and_restarted(
    broker: Mosquitto, watcher: Watcher, programs: dict[str, Program], tmp_path: Path
) -> None:
    start_ingest(programs, broker, tmp_path)
    agent = start_scan(programs, broker, tmp_path, "--frame-delay", "0.2")
    wait_committed(watcher, IMAGE, 4)
    agent.kill()
    committed_before = image_status(watcher, IMAGE)["tiles_committed"]
    assert committed_before < TOTAL
    # The acquisition program restarts and repeats the scan; what the agent already holds
    # (buffered or committed) is not taken twice.
    agent = start_scan(programs, broker, tmp_path, "--image-id", str(IMAGE))
    _finish(agent, watcher, tmp_path)

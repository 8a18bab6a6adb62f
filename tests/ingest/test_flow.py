"""Fleet-level flow control's bookkeeping (server_ingest/flow.py): the sum of the windows
stays within the budget however the fleet grows, and every device gets a share."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from server_ingest.flow import Windows
from server_ingest.settings import FlowSettings
from tests.ingest.harness import DEVICE, Harness
from tilebridge_protocol.messages import CreditAck
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.testing.manifests import make_manifest

MiB = 1024 * 1024
FLOW = FlowSettings(broker_bytes=64 * MiB, min_window_bytes=2 * MiB, max_window_bytes=16 * MiB)


def test_one_device_gets_the_largest_window_and_is_told_once() -> None:
    windows = Windows(FLOW)
    assert windows.seen("scope-1", 0.0) == 16 * MiB
    assert windows.seen("scope-1", 0.1) is None
    assert windows.seen("scope-1", 5.0) is None


def test_a_growing_fleet_shrinks_the_windows_and_an_idle_device_gives_its_share_back() -> None:
    windows = Windows(FLOW)
    told = {f"scope-{n}": windows.seen(f"scope-{n}", 0.0) for n in range(16)}
    assert told["scope-0"] == 16 * MiB
    for n in range(16):  # every device sends again: each ends at its share, 4 MiB
        told[f"scope-{n}"] = windows.seen(f"scope-{n}", 1.0) or told[f"scope-{n}"]
    for n in range(16):
        told[f"scope-{n}"] = windows.seen(f"scope-{n}", 2.0) or told[f"scope-{n}"]
    assert set(told.values()) == {4 * MiB}
    assert windows.granted == 64 * MiB
    # Fifteen fall silent for longer than active_s: the last one gets the largest window.
    assert windows.seen("scope-0", 2.0 + FLOW.active_s + 1) == 16 * MiB
    assert windows.granted == 16 * MiB


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 199), st.floats(0, 0.5)), min_size=1, max_size=400))
def test_the_windows_never_hold_more_than_the_budget_and_a_minimum_each(
    sends: list[tuple[int, float]],
) -> None:
    windows = Windows(FLOW)
    now = 0.0
    current: dict[str, int] = {}
    for device, step in sends:
        now += step
        window = windows.seen(f"scope-{device}", now)
        if window is not None:
            current[f"scope-{device}"] = window
        assert FLOW.min_window_bytes <= current[f"scope-{device}"] <= FLOW.max_window_bytes
        active = len(windows._devices)
        assert windows.granted <= FLOW.broker_bytes + active * FLOW.min_window_bytes


def test_the_ingest_grants_windows_on_the_ack_topic_as_the_fleet_grows(tmp_path: Path) -> None:
    flow = FlowSettings(broker_bytes=8 * MiB, min_window_bytes=MiB, max_window_bytes=8 * MiB)
    harness = Harness(tmp_path, flow=flow)
    try:
        manifest = make_manifest()
        harness.send(DeviceTopic.OPEN, manifest.to_bytes())
        assert harness.recorder.credits == [(DEVICE, CreditAck(window_bytes=8 * MiB))]
        for n in range(2, 5):  # three more devices: each gets what is left, then its share
            harness.send(DeviceTopic.OPEN, make_manifest().to_bytes(), device=f"scope-{n}")
        harness.send(DeviceTopic.OPEN, manifest.to_bytes())  # the first one sends again
        latest = dict(harness.recorder.credits)
        assert latest[DEVICE].window_bytes == 2 * MiB
        assert all(c.window_bytes >= MiB for c in latest.values())
        assert harness.recorder.acks  # the opens were answered as ever
    finally:
        harness.close()

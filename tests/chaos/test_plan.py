"""The seeded plan: reproducible, covering every kind, scans spread over the fault phase."""

from __future__ import annotations

import pytest

from devtools.chaos.plan import BOTH, DEVICE_FAULTS, DEVICES, FAULT_KINDS, family, make_plan


def test_the_same_seed_gives_the_same_plan_and_another_seed_another() -> None:
    assert make_plan(7, 30, 12) == make_plan(7, 30, 12)
    assert make_plan(7, 30, 12).faults != make_plan(8, 30, 12).faults


def test_every_kind_is_tried_once_there_are_as_many_faults_as_kinds() -> None:
    plan = make_plan(3, len(FAULT_KINDS), 4)
    assert sorted(f.kind for f in plan.faults) == sorted(FAULT_KINDS)
    bigger = make_plan(3, 3 * len(FAULT_KINDS) + 2, 4)
    counts = {k: sum(f.kind == k for f in bigger.faults) for k in FAULT_KINDS}
    assert set(counts.values()) <= {3, 4}


def test_targets_amounts_and_holds_fit_their_kind() -> None:
    plan = make_plan(11, 200, 10)
    for fault in plan.faults:
        if fault.kind == "spool-full":
            assert fault.target in DEVICES
        elif fault.kind in DEVICE_FAULTS:
            assert fault.target in (*DEVICES, BOTH)
        else:
            assert fault.target in ("ingest", "broker", "omero")
        if family(fault.kind) == "disk":
            assert fault.amount >= 0
        elif fault.kind == "omero-crash-mid-write":
            assert fault.amount >= 1
        else:
            assert fault.amount == 0
        low, high = (0.5, 15.0)
        assert low <= fault.hold_s <= high and fault.gap_s > 0
    assert {f.target for f in plan.faults if f.kind == "spool-full"} == set(DEVICES)
    assert {f.target for f in plan.faults if f.kind == "agent-kill"} == {*DEVICES, BOTH}


def test_scans_alternate_devices_and_spread_over_the_fault_phase() -> None:
    plan = make_plan(5, 40, 10)
    assert [s.device for s in plan.scans] == [DEVICES[n % 2] for n in range(10)]
    assert len({s.image_id for s in plan.scans}) == 10
    for device in DEVICES:
        starts = [s.start_at_s for s in plan.scans_of(device)]
        assert starts == sorted(starts) and starts[0] == 0
        assert starts[-1] < plan.span_s
        # paced so a device is busy for much of the phase: faults land mid-scan
        busy = sum(s.frame_interval_s * s.tile_count for s in plan.scans_of(device))
        assert busy > 0.3 * plan.span_s


def test_a_time_bound_shortens_the_span_and_kinds_can_be_chosen() -> None:
    long = make_plan(1, 200, 100)
    short = make_plan(1, 200, 100, minutes=2)
    assert short.span_s <= 2 * 60 < long.span_s
    only = make_plan(1, 9, 2, kinds=("agent-kill", "spool-full"))
    assert {f.kind for f in only.faults} == {"agent-kill", "spool-full"}
    with pytest.raises(ValueError, match="unknown fault kinds"):
        make_plan(1, 3, 2, kinds=("disk-on-fire",))

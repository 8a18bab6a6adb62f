"""The seeded plan of a chaos run: which faults, in which order, held how long; which scans.

Pure: the same seed and bounds give the same plan on any machine, so a finding is reproduced
with `make chaos SEED=<seed> FAULTS=<n> SCANS=<m>` (only the timing of the real programs
varies). Fault kinds come in rounds, each round a seeded shuffle of every allowed kind, so a
run with at least as many faults as kinds tries each kind; faults never overlap (one is
healed before the next is injected), which keeps each finding attributable to one kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal
from uuid import UUID, uuid5

DEVICES = ("scope-a", "scope-b")
"""Two devices at once; the first writes mosaics, the second per-tile images."""

FAULT_KINDS: dict[str, str] = {
    "agent-kill": "kill -9 one edge agent; restarted after the hold",
    "agent-stall": "SIGSTOP one edge agent; SIGCONT after the hold",
    "ingest-kill": "kill -9 the ingest; restarted after the hold",
    "ingest-stall": "SIGSTOP the ingest; SIGCONT after the hold",
    "broker-kill": "kill -9 Mosquitto (its last autosave survives); restarted after the hold",
    "broker-restart": "stop Mosquitto cleanly (it saves its persistence file); start it again",
    "broker-wipe": "kill -9 Mosquitto and delete its persistence file; start it empty",
    "broker-stall": "SIGSTOP Mosquitto; SIGCONT after the hold",
    "ingest-disk-full": "fill the ingest's data disk (staging, ledger, archive); free it",
    "spool-full": "fill one edge agent's spool disk; free it",
    "omero-stop": "stop the OMERO stand-in (connections refused); start it again",
    "omero-stall": "SIGSTOP the OMERO stand-in process; SIGCONT after the hold",
    "omero-crash": "crash the OMERO stand-in now (calls in progress die); start it again",
    "omero-crash-mid-write": "crash the OMERO stand-in after a few more setTile calls",
}
"""Every fault kind and what it does (docs/chaos.md says more)."""

DEVICE_FAULTS = frozenset({"agent-kill", "agent-stall", "spool-full"})
BOTH = "both"
"""Target of an agent-kill or agent-stall that hits both devices' agents at once."""
Family = Literal["kill", "stall", "disk", "omero"]


def family(kind: str) -> Family:
    if kind.endswith(("-stall",)):
        return "stall"
    if kind.endswith(("-full",)):
        return "disk"
    if kind.startswith("omero-"):
        return "omero"
    return "kill"


@dataclass(frozen=True)
class Timing:
    """Ranges (seconds) the plan draws from; the defaults suit 2 cores shared with others."""

    gap: tuple[float, float] = (1.0, 4.0)
    """Calm between a heal and the next fault."""
    kill: tuple[float, float] = (0.5, 4.0)
    """Down time after a kill or a stop."""
    stall: tuple[float, float] = (1.0, 8.0)
    disk: tuple[float, float] = (2.0, 8.0)
    omero: tuple[float, float] = (2.0, 8.0)
    scan_wait_s: float = 30.0
    """A fault is injected once a scan it can meet is being acquired (the target device's for
    agent and spool faults, either device's for the others), or after this long."""
    armed_wait_s: float = 60.0
    """How long an armed mid-write crash waits for pixel writes to crash into; its hold is
    the down time after the crash."""
    busy: tuple[float, float] = (0.5, 0.9)
    """Share of its slot a device spends acquiring a scan: frames are paced so scans cover
    most of the fault phase, and faults land mid-scan."""
    frame_interval: tuple[float, float] = (0.02, 5.0)
    """Bounds on the pause between two frames."""
    fault_overhead_s: float = 0.5
    """What injecting and healing costs on top of the hold (restarts), for pacing scans."""

    def hold(self, kind: str) -> tuple[float, float]:
        return {"kill": self.kill, "stall": self.stall, "disk": self.disk, "omero": self.omero}[
            family(kind)
        ]


@dataclass(frozen=True)
class FaultStep:
    number: int
    kind: str
    target: str
    """The device for agent-* (or `both`) and spool-full; else the part: ingest, broker,
    omero."""
    gap_s: float
    hold_s: float
    amount: int
    """spool-full / ingest-disk-full: bytes left free; omero-crash-mid-write: setTile calls
    before the crash; else 0."""

    def describe(self) -> str:
        extra = ""
        if family(self.kind) == "disk":
            extra = f", {self.amount} bytes left free"
        elif self.kind == "omero-crash-mid-write":
            extra = f", after {self.amount} setTile calls"
        return f"#{self.number} {self.kind} {self.target} for {self.hold_s:.1f} s{extra}"


@dataclass(frozen=True)
class ScanStep:
    number: int
    device: str
    columns: int
    rows: int
    channels: int
    tile_size: int
    frame_interval_s: float
    start_at_s: float
    """Offset from the start of the run; a device's scans also wait for each other."""
    seed: int
    image_id: UUID

    @property
    def tile_count(self) -> int:
        return self.columns * self.rows * self.channels

    @property
    def tile_bytes(self) -> int:
        return self.tile_size * self.tile_size * 2  # uint16


@dataclass(frozen=True)
class ChaosPlan:
    seed: int
    faults: tuple[FaultStep, ...]
    scans: tuple[ScanStep, ...]
    span_s: float
    """How long the fault phase is expected to take."""
    timing: Timing = Timing()

    def scans_of(self, device: str) -> list[ScanStep]:
        return [s for s in self.scans if s.device == device]


_NAMESPACE = UUID("c4a05f0e-8f1d-4d7e-9a51-2b6c0f4e7d10")
TILE_SIZES = (128, 256)
"""128 px tiles (32 KiB) are single-chunk tiles at the runner's 64 KiB chunk size, 256 px
tiles (128 KiB) take two chunks: both reassembly paths get faults."""


def make_plan(
    seed: int,
    faults: int,
    scans: int,
    kinds: tuple[str, ...] = tuple(FAULT_KINDS),
    minutes: float = 30.0,
    timing: Timing = Timing(),
) -> ChaosPlan:
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    rng = random.Random(seed)
    fault_steps = _faults(rng, faults, kinds, timing)
    estimate = sum(f.gap_s + f.hold_s + timing.fault_overhead_s for f in fault_steps)
    span = max(10.0, min(estimate, minutes * 60 * 0.8))
    return ChaosPlan(seed, fault_steps, _scans(rng, seed, scans, span, timing), span, timing)


def _faults(
    rng: random.Random, count: int, kinds: tuple[str, ...], timing: Timing
) -> tuple[FaultStep, ...]:
    order: list[str] = []
    while len(order) < count:
        round_ = list(kinds)
        rng.shuffle(round_)
        order += round_
    steps = []
    biggest_tile = max(TILE_SIZES) ** 2 * 2
    for number, kind in enumerate(order[:count], start=1):
        if kind == "spool-full":
            target = rng.choice(DEVICES)
        elif kind in DEVICE_FAULTS:
            target = rng.choice([*DEVICES, BOTH])
        else:
            target = kind.split("-")[0]
        amount = 0
        if family(kind) == "disk":
            # Nothing left, or room for a few tiles: both the up-front space check and a write
            # that runs out of space half way get their turn.
            amount = rng.choice([0, rng.randrange(0, 4 * biggest_tile)])
        elif kind == "omero-crash-mid-write":
            amount = rng.randint(1, 3)
        steps.append(
            FaultStep(
                number=number,
                kind=kind,
                target=target,
                gap_s=round(rng.uniform(*timing.gap), 2),
                hold_s=round(rng.uniform(*timing.hold(kind)), 2),
                amount=amount,
            )
        )
    return tuple(steps)


def _scans(
    rng: random.Random, seed: int, count: int, span: float, timing: Timing
) -> tuple[ScanStep, ...]:
    steps = []
    per_device = {
        d: [n for n in range(count) if n % len(DEVICES) == i] for i, d in enumerate(DEVICES)
    }
    for device, numbers in per_device.items():
        slot = span / max(1, len(numbers))
        for position, number in enumerate(numbers):
            columns, rows, channels = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
            interval = slot * rng.uniform(*timing.busy) / (columns * rows * channels)
            low, high = timing.frame_interval
            steps.append(
                ScanStep(
                    number=number,
                    device=device,
                    columns=columns,
                    rows=rows,
                    channels=channels,
                    tile_size=rng.choice(TILE_SIZES),
                    frame_interval_s=round(min(high, max(low, interval)), 3),
                    start_at_s=round(slot * position, 2),
                    seed=rng.randrange(1 << 30),
                    image_id=uuid5(_NAMESPACE, f"{seed}/{number}"),
                )
            )
    return tuple(sorted(steps, key=lambda s: s.number))

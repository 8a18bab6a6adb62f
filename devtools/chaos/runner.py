"""One chaos run: start the stack, scan on two devices while the plan's faults hit, heal, wait
for the drain (bounded), freeze the programs, verify every image, report.

Concurrency: the main thread owns every process (it injects, heals, and lets the
`Supervisor` restart what ended on its own); one `Microscope` thread per device does the
acquisition over HTTP and owns its records (only its `acquiring` event is read meanwhile);
the `Observer` (paho's thread) only witnesses, behind its lock. Nothing else is shared.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from uuid import UUID

import httpx

from devtools.chaos import locate
from devtools.chaos.disks import MiB, unmount_stale
from devtools.chaos.faults import FaultEvent, Injector
from devtools.chaos.microscope import Microscope, ScanRecord
from devtools.chaos.observe import Observer
from devtools.chaos.plan import BOTH, DEVICES, FAULT_KINDS, ChaosPlan, FaultStep, make_plan
from devtools.chaos.stack import LAYOUTS, ChaosStack
from devtools.chaos.supervise import Exit, Supervisor
from devtools.chaos.timeline import Timeline
from devtools.chaos.verify import ImageVerdict, omero_images_of, verify_scan
from devtools.stack import wait_for
from edge_agent.client import EdgeApiError, EdgeClient

TICK_S = 0.2


@dataclass(frozen=True)
class Options:
    seed: int = 1
    faults: int = 20
    scans: int = 10
    minutes: float = 15.0
    """Bound on the fault and acquisition phase; the drain and verification come on top."""
    drain_s: float = 180.0
    """Longest wait, after the last fault and the last scan, for every image to finish."""
    kinds: tuple[str, ...] = tuple(FAULT_KINDS)
    workdir: Path = Path("/tmp/tilebridge-chaos")
    echo: bool = True
    """Print the timeline as it happens."""


@dataclass
class Outcome:
    options: Options
    plan: ChaosPlan
    started: float
    """When the run began (monotonic): the origin of the timeline and the JSON offsets."""
    t0: float
    """When the acquisition and the faults began."""
    events: list[FaultEvent] = field(default_factory=list)
    records: list[ScanRecord] = field(default_factory=list)
    skipped: int = 0
    exits: list[Exit] = field(default_factory=list)
    verdicts: list[ImageVerdict] = field(default_factory=list)
    omero_orphans: list[str] = field(default_factory=list)
    archive_leftovers: list[str] = field(default_factory=list)
    last_fault_at: float | None = None
    last_scan_at: float | None = None
    drained_at: float | None = None
    last_finished_at: float | None = None
    """When the last image that did finish finished (the drain's progress, also when some
    images never finish)."""
    not_drained: list[str] = field(default_factory=list)
    error: str | None = None
    """The run itself could not go on (the stack did not come up, the stand-in died...)."""


MARKER = ".tilebridge-chaos"


def fresh_workdir(path: Path) -> None:
    """Empty `path` for a new run, unmounting what a killed run left mounted; refuses a
    folder that is neither empty nor an earlier run's."""
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise ValueError(f"{path} is not empty and not a chaos workdir: refusing to clear it")
    unmount_stale(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / MARKER).touch()


def disk_sizes(plan: ChaosPlan) -> tuple[int, int]:
    """(ingest data disk, each spool): room for everything the run stores, with margin."""
    total = sum(s.tile_count * s.tile_bytes for s in plan.scans)
    return 128 * MiB + 3 * total, 64 * MiB


class Runner:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.plan = make_plan(
            options.seed, options.faults, options.scans, options.kinds, options.minutes
        )
        self.workdir = options.workdir
        fresh_workdir(self.workdir)
        ingest_bytes, spool_bytes = disk_sizes(self.plan)
        self.stack = ChaosStack(self.workdir, ingest_bytes, spool_bytes)
        self.timeline = Timeline(self.workdir / "chaos.log", echo=options.echo)
        started = self.timeline.started
        self.outcome = Outcome(options, self.plan, started, started)
        self.supervisor = Supervisor(self.stack, self.timeline, self.outcome.exits)
        self.stop = threading.Event()

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Outcome:
        observer: Observer | None = None
        try:
            self.timeline.say(
                f"plan: seed {self.plan.seed}, {len(self.plan.faults)} faults, "
                f"{len(self.plan.scans)} scans, span {self.plan.span_s:.0f} s"
            )
            self.stack.start()
            observer = Observer(self.stack.broker.broker.host, self.stack.broker.broker.port)
            self._wait_ready(observer)
            self._acquire_under_faults()
            self._drain(observer)
            self._freeze()
            self._verify(observer)
        except Exception as exc:
            self.outcome.error = f"{type(exc).__name__}: {exc}"
            self.timeline.say(f"run aborted: {self.outcome.error}")
            raise
        finally:
            self.stop.set()
            if observer is not None:
                observer.close()
            self.stack.snapshot_logs(self.workdir / "logs")
            self.stack.close()
        return self.outcome

    def _wait_ready(self, observer: Observer) -> None:
        wait_for(
            lambda: (s := observer.ingest_status()) and s.state == "online" and s.broker_connected,
            90,
            "the ingest online",
        )
        for device in DEVICES:
            with EdgeClient(self.stack.agent_url(device), timeout=10) as client:
                wait_for(partial(_answers, client), 90, f"the agent of {device}")
        self.timeline.say("stack ready: broker, OMERO stand-in, ingest, 2 agents")

    def _acquire_under_faults(self) -> None:
        o = self.outcome
        o.t0 = time.monotonic()
        deadline = o.t0 + self.options.minutes * 60
        microscopes = [
            Microscope(
                d,
                self.stack.agent_url(d),
                LAYOUTS[d],
                self.plan.scans_of(d),
                o.t0,
                deadline,
                self.stop,
                self.timeline.say,
            )
            for d in DEVICES
        ]
        for m in microscopes:
            m.start()
        injector = Injector(self.stack)
        for step in self.plan.faults:
            if not self._idle(step.gap_s, deadline):
                self.timeline.say(f"time bound reached: faults from #{step.number} not injected")
                break
            self._idle_until(partial(_scanning, microscopes, step), self.plan.timing.scan_wait_s)
            event, self.supervisor.held = injector.inject(step)
            self.timeline.say(f"inject {step.describe()} {event.note}".rstrip())
            waited = self._idle_until(partial(injector.fired, event), self.plan.timing.armed_wait_s)
            self._idle(step.hold_s if waited else 0.0)
            try:
                injector.heal(event)
            except RuntimeError as exc:  # e.g. Mosquitto not listening yet: retried below
                event.healed_at = time.monotonic()
                event.note = f"{event.note}; healing failed ({exc}), left to the supervisor"
            self.supervisor.held = set()
            o.events.append(event)
            o.last_fault_at = event.healed_at
            self.timeline.say(f"healed #{step.number} {step.kind} {event.note}".rstrip())
        while any(m.is_alive() for m in microscopes):
            self._idle(1.0)
        for m in microscopes:
            o.records += m.records
            o.skipped += len(m.skipped)
        o.records.sort(key=lambda r: r.step.number)
        acquired = [r.acquired_at for r in o.records if r.acquired_at is not None]
        o.last_scan_at = max(acquired, default=None)
        self.timeline.say(f"acquisition over: {len(acquired)} of {len(o.records)} scans acquired")

    def _drain(self, observer: Observer) -> None:
        o = self.outcome
        since = max(o.last_fault_at or o.t0, o.last_scan_at or o.t0)
        deadline = since + self.options.drain_s
        clients = {d: EdgeClient(self.stack.agent_url(d), timeout=10) for d in DEVICES}
        try:
            self._await_drain(observer, clients, deadline)
        finally:
            for client in clients.values():
                client.close()

    def _await_drain(
        self, observer: Observer, clients: dict[str, EdgeClient], deadline: float
    ) -> None:
        o = self.outcome
        left = len(o.records) + 1
        while True:
            pending = [r for r in o.records if not self._drained(r, observer, clients)]
            if len(pending) < left:
                left, o.last_finished_at = len(pending), time.monotonic()
            if not pending:
                o.drained_at = time.monotonic()
                self.timeline.say("drained: every image finished")
                return
            if time.monotonic() > deadline:
                o.not_drained = [str(r.step.image_id) for r in pending]
                self.timeline.say(
                    f"{len(pending)} images did not drain in {self.options.drain_s:.0f} s"
                )
                return
            self._idle(1.0)

    def _drained(
        self, record: ScanRecord, observer: Observer, clients: dict[str, EdgeClient]
    ) -> bool:
        """The image will not change any more: its agent has the server's final answer
        (`server` is no longer `sending`), and the ingest either stored it (its staging is
        gone) or failed it."""
        if not record.acquired:
            return True  # nothing more is coming; judged as not acquired
        step = record.step
        if _edge_server_state(clients[step.device], step.image_id) == "sending":
            return False
        staged = locate.staging_holds(self.stack.ingest_disk.path, step.device, step.image_id)
        return not staged or observer.final_phase(step.image_id) in ("failed", "rejected")

    def _freeze(self) -> None:
        """Stop the programs cleanly, so nothing moves while it is verified."""
        for part in [*self.stack.agents.values(), self.stack.ingest]:
            part.stop()

    def _verify(self, observer: Observer) -> None:
        o = self.outcome
        images = self.stack.omero.images()
        claimed: set[int] = set()
        for record in o.records:
            step = record.step
            mine = omero_images_of(images, step.image_id)
            claimed.update(i["id"] for i in mine)
            o.verdicts.append(
                verify_scan(
                    record,
                    spool=self.stack.spools[step.device].path,
                    data_dir=self.stack.ingest_disk.path,
                    omero_images=mine,
                    standin=self.stack.omero,
                    drained=str(step.image_id) not in o.not_drained,
                    final=observer.final_phase(step.image_id),
                )
            )
        o.omero_orphans = [
            f"Image:{i['id']} {i['name']!r} ({i['state']}, {i['description']!r})"
            for i in images
            if i["id"] not in claimed
        ]
        o.archive_leftovers = [
            str(p) for p in locate.archive_leftovers(self.stack.ingest_disk.path)
        ]

    # -- supervision ------------------------------------------------------------------------

    def _idle(self, seconds: float, deadline: float | None = None) -> bool:
        """Supervise for `seconds`; False if `deadline` passes first."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.supervisor.tick()
            time.sleep(TICK_S)
        return deadline is None or time.monotonic() <= deadline

    def _idle_until(self, condition: Callable[[], bool], seconds: float) -> bool:
        """Supervise until `condition` holds (True) or `seconds` pass (False)."""
        end = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > end:
                return False
            self._idle(TICK_S)
        return True


def _scanning(microscopes: list[Microscope], step: FaultStep) -> bool:
    """Whether a scan the fault can meet is being acquired: on the target device for the
    agent and spool faults, on either device for the others."""
    if not any(m.is_alive() for m in microscopes):
        return True  # every scan is over: nothing to wait for
    hit = [m for m in microscopes if step.target in (m.device, BOTH) or step.target not in DEVICES]
    return any(m.acquiring.is_set() for m in hit)


def _edge_server_state(client: EdgeClient, image_id: UUID) -> str | None:
    """The agent's word on the image's server side: sending, complete, failed, refused;
    None if it no longer knows the image. `sending` while it cannot be asked."""
    try:
        return str(client.experiment(image_id)["server"])
    except EdgeApiError as exc:
        return None if exc.status_code == 404 else "sending"
    except httpx.TransportError:
        return "sending"


def _answers(client: EdgeClient) -> bool:
    try:
        client.status()
        return True
    except httpx.TransportError:
        return False

"""The table a chaos run ends with, and its JSON twin.

Reading the table: `lost` tiles are nowhere (not stored, not staged, not buffered); tiles
still on their way when the drain bound ran out are `staged` / `buffered` (stuck, not lost);
`duplicated` counts extra stored copies; `corrupted` tiles are stored or staged with other
pixels than acquired. The run passes only if every scan's image is complete (acquired,
drained, every tile delivered exactly once, pixel for pixel, to the archive and to OMERO) and
nothing is orphaned.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

from devtools.chaos.microscope import ScanRecord
from devtools.chaos.runner import Outcome
from devtools.chaos.verify import Fate


@dataclass
class Summary:
    faults_by_kind: Counter[str]
    faults_planned: int
    faults_not_fired: int
    scans_planned: int
    scans_acquired: int
    scans_complete: int
    scans_skipped: int
    tiles: Counter[str]
    """Fate -> tiles; plus 'acquired', 'duplicated', 'corrupted'."""
    omero_orphans: int
    archive_leftovers: int
    drain_after_fault_s: float | None
    drain_after_scan_s: float | None
    last_finished_after_fault_s: float | None
    exits: Counter[str]
    client: Counter[str]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def summarize(o: Outcome) -> Summary:
    tiles: Counter[str] = Counter()
    for v in o.verdicts:
        tiles.update({fate.value: n for fate, n in v.counts.items()})
        tiles["acquired"] += len(v.record.answered)
        tiles["duplicated"] += v.duplicated
        tiles["corrupted"] += len(v.corrupted)
    client: Counter[str] = Counter()
    for r in o.records:
        client.update(
            busy=r.busy,
            connection_errors=r.connection_errors,
            forgotten=r.forgotten,
            refusals=len(r.refusals),
        )
    s = Summary(
        faults_by_kind=Counter(e.step.kind for e in o.events),
        faults_planned=len(o.plan.faults),
        faults_not_fired=sum(1 for e in o.events if e.note.startswith("did not fire")),
        scans_planned=len(o.plan.scans),
        scans_acquired=sum(1 for r in o.records if r.acquired),
        scans_complete=sum(1 for v in o.verdicts if v.complete),
        scans_skipped=o.skipped,
        tiles=tiles,
        omero_orphans=len(o.omero_orphans),
        archive_leftovers=len(o.archive_leftovers),
        drain_after_fault_s=_since(o.drained_at, o.last_fault_at),
        drain_after_scan_s=_since(o.drained_at, o.last_scan_at),
        last_finished_after_fault_s=_since(o.last_finished_at, o.last_fault_at),
        exits=Counter(e.part for e in o.exits),
        client=client,
    )
    s.failures = _failures(o, s)
    return s


def _since(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else max(0.0, end - start)


def _failures(o: Outcome, s: Summary) -> list[str]:
    out = []
    if o.error:
        out.append(f"the run did not finish: {o.error}")
    for what in ("lost", "duplicated", "corrupted"):
        key = Fate.LOST.value if what == "lost" else what
        if s.tiles[key]:
            out.append(f"{s.tiles[key]} tiles {what}")
    incomplete = [v for v in o.verdicts if not v.complete]
    if incomplete:
        out.append(f"{len(incomplete)} of {len(o.verdicts)} images incomplete")
    if o.not_drained:
        out.append(f"{len(o.not_drained)} images did not drain")
    if s.omero_orphans:
        out.append(f"{s.omero_orphans} orphan OMERO images")
    if s.archive_leftovers:
        out.append(f"{s.archive_leftovers} partial archive files left behind")
    return out


def render(o: Outcome, s: Summary) -> RenderableType:
    faults = Table(title=f"chaos run, seed {o.plan.seed}: faults")
    faults.add_column("kind")
    faults.add_column("injected", justify="right")
    for kind, n in sorted(s.faults_by_kind.items()):
        faults.add_row(kind, str(n))
    faults.add_row("total", f"{sum(s.faults_by_kind.values())} of {s.faults_planned} planned")
    if s.faults_not_fired:
        faults.add_row("  armed crashes that never fired", str(s.faults_not_fired))

    res = Table(title="result", show_header=False)
    res.add_column("what")
    res.add_column("value", justify="right")
    res.add_row(
        "scans planned / acquired / complete",
        f"{s.scans_planned} / {s.scans_acquired} / {s.scans_complete}",
    )
    if s.scans_skipped:
        res.add_row("scans not started (time bound)", str(s.scans_skipped))
    res.add_row("tiles acquired", str(s.tiles["acquired"]))
    for fate in Fate:
        if fate in (Fate.DELIVERED, Fate.LOST) or s.tiles[fate.value]:
            res.add_row(f"tiles {fate.value}", str(s.tiles[fate.value]))
    res.add_row("tiles duplicated", str(s.tiles["duplicated"]))
    res.add_row("tiles corrupted", str(s.tiles["corrupted"]))
    res.add_row("orphan OMERO images", str(s.omero_orphans))
    res.add_row("partial archive files left", str(s.archive_leftovers))
    res.add_row("time to drain after the last fault", _seconds(s.drain_after_fault_s, o))
    res.add_row("time to drain after the last scan", _seconds(s.drain_after_scan_s, o))
    if o.not_drained and s.last_finished_after_fault_s is not None:
        res.add_row(
            "  the last image that finished, after the last fault",
            f"{s.last_finished_after_fault_s:.1f} s",
        )
    res.add_row(
        "programs that exited by themselves",
        ", ".join(f"{p} x{n}" for p, n in sorted(s.exits.items())) or "none",
    )
    res.add_row(
        "client: 503 busy / dropped connections / forgotten experiments / refusals",
        f"{s.client['busy']} / {s.client['connection_errors']} / "
        f"{s.client['forgotten']} / {s.client['refusals']}",
    )
    parts: list[RenderableType] = [faults, res]
    bad = [v for v in o.verdicts if not v.complete]
    if bad:
        images = Table(title="images that are not complete")
        for column in ("scan", "device", "image id", "tiles by fate", "ingest said",
                       "faults meanwhile", "why"):  # fmt: skip
            images.add_column(column)
        for v in bad:
            r = v.record
            why = [*v.problems, *r.refusals]
            if not r.acquired:
                why.insert(0, r.gave_up or "not acquired")
            if not v.drained:
                why.insert(0, "did not drain")
            if r.server_stream and r.server_stream.get("state") == "failed":
                why.append(f"agent: server stream failed: {r.server_stream.get('error')}")
            elif r.server in ("failed", "refused"):
                why.append(f"agent: server {r.server}")
            fates = ", ".join(f"{f.value} {n}" for f, n in sorted(v.counts.items()))
            images.add_row(
                str(r.step.number),
                r.step.device,
                str(r.step.image_id),
                fates,
                v.final or "-",
                ", ".join(faults_meanwhile(o, r)) or "-",
                "; ".join(why)[:300] or "-",
            )
        parts.append(images)
    verdict = "PASS" if s.ok else "FAIL: " + "; ".join(s.failures)
    parts.append(f"[bold {'green' if s.ok else 'red'}]{verdict}[/]")
    return Group(*parts)


AFTERMATH_S = 15.0
"""A fault this soon after a scan's last frame still meets its image on the way."""


def faults_meanwhile(o: Outcome, record: ScanRecord) -> list[str]:
    """The faults that overlapped the scan, from its start to shortly after its last frame:
    where to look first for the cause of an incomplete image."""
    start = record.started_at or o.t0
    end = (record.acquired_at or o.last_fault_at or start) + AFTERMATH_S
    return [
        f"#{e.step.number} {e.step.kind} {e.step.target}"
        for e in o.events
        if e.injected_at <= end and (e.healed_at or end) >= start
    ]


def _seconds(value: float | None, o: Outcome) -> str:
    if value is not None:
        return f"{value:.1f} s"
    return f"did not drain in {o.options.drain_s:.0f} s" if o.not_drained else "-"


def to_json(o: Outcome, s: Summary, logs: dict[str, Any]) -> dict[str, Any]:
    t0 = o.started
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o.options).items()},
        "ok": s.ok,
        "failures": s.failures,
        "summary": {
            "faults_by_kind": dict(s.faults_by_kind),
            "faults_planned": s.faults_planned,
            "faults_not_fired": s.faults_not_fired,
            "scans_planned": s.scans_planned,
            "scans_acquired": s.scans_acquired,
            "scans_complete": s.scans_complete,
            "scans_skipped": s.scans_skipped,
            "tiles": dict(s.tiles),
            "omero_orphans": o.omero_orphans,
            "archive_leftovers": o.archive_leftovers,
            "drain_after_fault_s": s.drain_after_fault_s,
            "drain_after_scan_s": s.drain_after_scan_s,
            "last_finished_after_fault_s": s.last_finished_after_fault_s,
            "exits": dict(s.exits),
            "client": dict(s.client),
            "not_drained": o.not_drained,
            "error": o.error,
        },
        "faults": [
            {
                "step": asdict(e.step),
                "injected_s": round(e.injected_at - t0, 2),
                "healed_s": None if e.healed_at is None else round(e.healed_at - t0, 2),
                "note": e.note,
            }
            for e in o.events
        ],
        "images": [
            {
                "scan": v.record.step.number,
                "device": v.record.step.device,
                "image_id": str(v.record.step.image_id),
                "complete": v.complete,
                "acquired": v.record.acquired,
                "drained": v.drained,
                "ingest_said": v.final,
                "fates": {f.value: n for f, n in v.counts.items()},
                "corrupted": sorted(list(k) for k in v.corrupted),
                "duplicated": v.duplicated,
                "problems": v.problems,
                "refusals": v.record.refusals,
                "gave_up": v.record.gave_up,
                "server_stream": v.record.server_stream,
                "omero_images": v.omero_ids,
                "faults_meanwhile": faults_meanwhile(o, v.record),
            }
            for v in o.verdicts
        ],
        "exits": [
            {"part": e.part, "at_s": round(e.at - t0, 2), "code": e.code, "log_tail": e.log_tail}
            for e in o.exits
        ],
        "logs": logs,
    }

"""The acquisition side: one thread per device acts as the microscope's control program
(ImSwitch, say) and sends its scans through the agent's local HTTP API with `EdgeClient`.

It follows the front door's resume contract (docs/acquisition.md) as a careful client would:
a frame counts as acquired once the agent answered 200 (it is durable by then); 503 means
"busy, try again"; a dropped connection means the agent is gone or stalled, so it waits, asks
for the experiment again and re-sends the frame it is not sure of. Should the agent ever not
know the experiment (404), the client starts it again under the same image id and sends
every frame again (a repeat changes nothing); that is counted, since the agent keeps its
experiments across restarts. Any other refusal (422, 409, 500) ends the scan, recorded with
the agent's words. Frames are the simulator's deterministic ones, so the verification can
regenerate each of them bit for bit.

Each thread owns its records; the runner reads them only after joining the thread (while it
runs, only the `acquiring` event is read from outside).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from devtools.chaos.plan import ScanStep
from edge_agent.client import EdgeApiError, EdgeClient
from edge_agent.models import ExperimentSpec
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest

ACQUIRED_AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
"""Fixed, so a restarted experiment has the very same manifest as the first try."""
PIXEL_UM = 0.65
OVERLAP = 0.1


def synthetic(step: ScanStep) -> SyntheticScan:
    return SyntheticScan(
        columns=step.columns,
        rows=step.rows,
        tile_size=step.tile_size,
        channels=step.channels,
        seed=step.seed,
        overlap=OVERLAP,
        pixel_um=PIXEL_UM,
    )


def experiment_spec(step: ScanStep, layout: str) -> dict[str, Any]:
    """The experiment as the acquisition program starts it: only the server stream, no local
    files, every field the manifest needs given (so a restart repeats it exactly)."""
    scan = synthetic(step)
    step_um = scan.step_px * PIXEL_UM
    return {
        "experiment": f"chaos-{step.number:03d}",
        "image_name": f"scan{step.number:03d}",
        "image_id": str(step.image_id),
        "tile_width": step.tile_size,
        "tile_height": step.tile_size,
        "dtype": "uint16",
        "pixel_size_um": PIXEL_UM,
        "grid": {
            "columns": step.columns,
            "rows": step.rows,
            "x_step_um": step_um,
            "y_step_um": step_um,
        },
        "channels": ["DAPI", "GFP"][: step.channels],
        "acquired_at": ACQUIRED_AT.isoformat(),
        "project": "chaos",
        "dataset": step.device,
        "key_values": {"chaos_scan": str(step.number), "seed": str(step.seed)},
        "layout": layout,
        "targets": [],
        "server": True,
    }


def expected_manifest(step: ScanStep, layout: str) -> OpenManifest:
    """The manifest the agent makes of this scan (the same model does it)."""
    return ExperimentSpec.model_validate(experiment_spec(step, layout)).manifest()


@dataclass
class ScanRecord:
    step: ScanStep
    manifest: OpenManifest
    started_at: float | None = None
    acquired_at: float | None = None
    """When `finalize` answered (monotonic); None: the scan was never fully acquired."""
    frames_answered: int = 0
    """POSTs of a frame answered 200 (repeats after an agent restart included)."""
    answered: set[TileKey] = field(default_factory=set)
    """Tiles the agent answered 200 for: acquired, as far as the camera can tell."""
    busy: int = 0
    """503 answers (the agent said: not now)."""
    connection_errors: int = 0
    forgotten: int = 0
    """Times the agent did not know the experiment mid-scan (404 after it was started)."""
    refusals: list[str] = field(default_factory=list)
    server_stream: dict[str, Any] | None = None
    """The agent's own account of the stream to the server after finalize."""
    server: str | None = None
    """The experiment's server state at finalize (sending, failed, refused, ...)."""
    gave_up: str | None = None

    @property
    def acquired(self) -> bool:
        return self.acquired_at is not None


class Microscope(threading.Thread):
    def __init__(
        self,
        device: str,
        url: str,
        layout: str,
        steps: list[ScanStep],
        t0: float,
        deadline: float,
        stop: threading.Event,
        say: Callable[[str], None] = lambda _: None,
        acquire_timeout_s: float = 180.0,
    ) -> None:
        super().__init__(name=f"microscope-{device}", daemon=True)
        self.device, self.url, self.layout, self.steps = device, url, layout, steps
        self.t0, self.deadline, self._halt = t0, deadline, stop
        self.acquire_timeout_s = acquire_timeout_s
        self.say = say
        self.records: list[ScanRecord] = []
        self.skipped: list[ScanStep] = []
        """Scans not started because the run's time bound came first."""
        self.acquiring = threading.Event()
        """Set while a scan is being acquired (the runner times faults by it)."""

    def run(self) -> None:
        with EdgeClient(self.url, timeout=20) as client:
            for step in self.steps:
                start_at = self.t0 + step.start_at_s
                while time.monotonic() < start_at and not self._halt.is_set():
                    time.sleep(0.1)
                if self._halt.is_set() or time.monotonic() > self.deadline:
                    self.skipped.append(step)
                    continue
                self.acquiring.set()
                try:
                    record = self._scan(client, step)
                finally:
                    self.acquiring.clear()
                self.records.append(record)
                how = "acquired" if record.acquired else f"NOT acquired ({record.gave_up})"
                self.say(
                    f"scan {step.number} on {self.device}: {how}, {len(record.answered)}/"
                    f"{step.tile_count} frames, {record.busy} busy, "
                    f"{record.connection_errors} dropped connections"
                )

    def _scan(self, client: EdgeClient, step: ScanStep) -> ScanRecord:
        scan = synthetic(step)
        spec = experiment_spec(step, self.layout)
        record = ScanRecord(step, expected_manifest(step, self.layout), time.monotonic())
        keys = record.manifest.tile_keys()
        positions = record.manifest.positions
        image_id = step.image_id
        # Long scans get longer: every frame may have to be sent twice after a restart.
        timeout = max(self.acquire_timeout_s, 3 * step.frame_interval_s * len(keys))
        give_up_at = time.monotonic() + timeout
        started, check, sent = False, False, 0
        while record.acquired_at is None:
            if time.monotonic() > give_up_at or self._halt.is_set():
                record.gave_up = f"not acquired after {timeout:.0f} s"
                return record
            try:
                if check or not started:
                    state = self._experiment_state(client, image_id)
                    if state is None:  # unknown to the agent: (re)start, send everything
                        if started:
                            record.forgotten += 1
                        client.start_experiment(**spec)
                        sent = 0
                    elif state in ("finalized", "finalizing") and sent == len(keys):
                        record.acquired_at = time.monotonic()
                        break
                    started, check = True, False
                if sent < len(keys):
                    key = keys[sent]
                    self._send(client, scan, image_id, key, positions[key.index])
                    record.frames_answered += 1
                    sent += 1
                    if key not in record.answered:  # a repeat is sent at once, not paced
                        record.answered.add(key)
                        time.sleep(step.frame_interval_s)
                else:
                    progress = client.finalize(image_id, timeout=30)
                    if progress["state"] in ("finalized", "finalizing"):
                        record.acquired_at = time.monotonic()
                        record.server_stream = progress["backends"].get("omero")
                        record.server = progress.get("server")
            except EdgeApiError as exc:
                if exc.status_code == 503:
                    record.busy += 1
                    time.sleep(0.5)
                elif exc.status_code == 404:
                    check = True
                else:
                    record.refusals.append(f"{exc.status_code}: {exc.message}")
                    record.gave_up = f"refused: {exc.status_code}: {exc.message}"
                    return record
            except httpx.TransportError:
                record.connection_errors += 1
                check = True
                time.sleep(0.3)
        return record

    @staticmethod
    def _experiment_state(client: EdgeClient, image_id: Any) -> str | None:
        try:
            return str(client.experiment(image_id)["state"])
        except EdgeApiError as exc:
            if exc.status_code == 404:
                return None
            raise

    @staticmethod
    def _send(
        client: EdgeClient, scan: SyntheticScan, image_id: Any, key: TileKey, position: Any
    ) -> None:
        client.write_frame(
            image_id,
            scan.frame(key),
            tile_index=key.index,
            z_index=key.z,
            channel_index=key.c,
            time_index=key.t,
            x_um=position.x_um,
            y_um=position.y_um,
        )

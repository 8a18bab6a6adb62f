"""Helpers shared by the edge tests (and other suites that acquire through the agent)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

from devtools.broker import Mosquitto
from edge_agent.app import EdgeApp
from edge_agent.frontdoor import FrontDoor
from edge_agent.http import serve
from edge_agent.live import MakeBackend, registry_backend
from edge_agent.models import ExperimentSpec, FrameInfo
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_runtime.mqtt import BrokerSettings

Frames = Callable[[TileKey], np.ndarray[Any, Any]]


@dataclass
class Stack:
    broker: Mosquitto
    ingest: IngestService
    app: EdgeApp
    settings: AgentSettings
    root: Path

    @property
    def archive(self) -> Path:
        return self.root / "ingest" / "archive"


@contextmanager
def running_stack(
    root: Path, make_backend: MakeBackend = registry_backend, **agent_settings: Any
) -> Iterator[Stack]:
    """A real Mosquitto, the ingest (archive backend) and an edge agent, in process."""
    with Mosquitto(root / "broker") as broker:
        broker_settings = BrokerSettings(port=broker.port)
        ingest = IngestService(
            IngestSettings(broker=broker_settings, data_dir=root / "ingest", status_interval_s=1)
        ).start()
        values: dict[str, Any] = {
            "broker": broker_settings, "spool_dir": root / "spool", "min_free_bytes": 0,
            "status_interval_s": 1, "local_output_root": root,
        }  # fmt: skip
        settings = AgentSettings(**(values | agent_settings))
        try:
            with EdgeApp(settings, make_backend) as app:
                http = serve(app) if settings.http_port is not None else None
                try:
                    yield Stack(broker, ingest, app, settings, root)
                finally:
                    if http is not None:
                        http.should_exit = True
        finally:
            ingest.stop()


def acquire(
    door: FrontDoor | EdgeApp,
    manifest: OpenManifest,
    frames: Frames,
    *,
    finalize: bool = True,
    **spec: Any,
) -> UUID:
    """Start the manifest's experiment (no local targets unless given), write every frame
    (with its planned stage position), finalize."""
    front: FrontDoor = door.acquisition if isinstance(door, EdgeApp) else door
    front.start(ExperimentSpec.from_manifest(manifest, **({"targets": []} | spec)))
    for key in manifest.tile_keys():
        position = manifest.positions[key.index]
        info = FrameInfo.at(key, x_um=position.x_um, y_um=position.y_um)
        front.write_frame(manifest.image_id, frames(key), info)
    if finalize:
        front.finalize(manifest.image_id)
    return manifest.image_id


def scan_spec(scan: SyntheticScan, **overrides: Any) -> dict[str, Any]:
    """The experiment spec of a SyntheticScan, as ImSwitch would describe it."""
    step = scan.step_px * scan.pixel_um
    spec: dict[str, Any] = {
        "experiment": "edge-test",
        "image_name": "scan",
        "tile_width": scan.tile_size,
        "tile_height": scan.tile_size,
        "dtype": "uint16",
        "pixel_size_um": scan.pixel_um,
        "z_step_um": 1.0,
        "grid": {"columns": scan.columns, "rows": scan.rows, "x_step_um": step, "y_step_um": step},
        "channels": ["DAPI", "GFP", "mCherry", "Cy5"][: scan.channels],
        "size_z": scan.z_planes,
        "key_values": {"objective": "20x"},
    }
    spec.update(overrides)
    return spec

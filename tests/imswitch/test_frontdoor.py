"""The adapter over the edge's front door (`edge_agent.frontdoor.FrontDoor`), against a small
door of this test's own that holds to the front door's models (`edge_agent.models`: the
spec, `FrameInfo` and its `PlaneMeta`, the answers) and writes the local targets with the
registry's backends, as the agent will. It shows the adapter asks the door for what it
documents: a valid spec with ImSwitch's local targets, every frame's measured metadata, a
partial close for holes. (The agent's side of the fast path is not on main yet; when it is,
tests/imswitch/test_end_to_end.py runs through it too.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from edge_agent.models import ExperimentSpec, FrameInfo, FrameResult, StartedExperiment
from tests.imswitch.checks import Scan, check_frame_tiffs, check_live_zarr
from tests.imswitch.imswitch_like import Camera, area, normal_mode
from tilebridge_imswitch import root
from tilebridge_imswitch.edge_frontdoor import FrontDoorEdge
from tilebridge_imswitch.settings import AdapterSettings
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_protocol.status import BackendProgress
from tilebridge_storage import registry
from tilebridge_storage.base import ImageWriter


class Door:
    """A front door kept in memory (one thread), local targets written for real."""

    def __init__(self) -> None:
        self.specs: dict[UUID, ExperimentSpec] = {}
        self.manifests: dict[UUID, OpenManifest] = {}
        self.frames: dict[UUID, dict[TileKey, PlaneMeta | None]] = {}
        self.writers: dict[UUID, dict[str, ImageWriter]] = {}
        self.partial: dict[UUID, bool] = {}

    def start(self, spec: ExperimentSpec | Mapping[str, Any]) -> StartedExperiment:
        spec = ExperimentSpec.model_validate(spec)
        assert spec.image_id is not None and spec.acquired_at is not None
        m = spec.manifest()
        self.specs[m.image_id], self.manifests[m.image_id] = spec, m
        self.frames[m.image_id] = {}
        self.writers[m.image_id] = {
            t.label: registry.create(t.kind, folder=t.folder).open_image("scope-1", m)
            for t in spec.targets or []
        }
        return StartedExperiment(
            image_id=m.image_id, resumed=False, spec=spec, experiment=m.experiment,
            acquired_at=m.acquired_at, state="acquiring", frames_total=m.tile_count,
            frames_received=0, tile_width=m.tile_width, tile_height=m.tile_height,
            dtype=m.dtype, tile_bytes=m.tile_bytes, positions=list(m.positions),
        )  # fmt: skip

    def write_frame(
        self, image_id: UUID, frame: np.ndarray[Any, Any], metadata: Any = None, **fields: Any
    ) -> FrameResult:
        info = FrameInfo.of(metadata, **fields)
        m = self.manifests[image_id]
        assert info.tile_index is not None and info.channel_index is not None
        key = TileKey(info.tile_index, info.z_index, info.channel_index, info.time_index)
        if key in self.frames[image_id]:
            return FrameResult(accepted=False, reason="repeat", tile=key, frames_received=0)
        self.frames[image_id][key] = info.plane(m.acquired_at)
        for writer in self.writers[image_id].values():
            writer.write_tile(key, frame)
        return FrameResult(accepted=True, tile=key, frames_received=len(self.frames[image_id]))

    def finalize(self, image_id: UUID, *, partial: bool = False, timeout: Any = None) -> Any:
        m, frames = self.manifests[image_id], self.frames[image_id]
        missing = [k for k in m.tile_keys() if k not in frames]
        if missing and not partial:
            raise PermanentError(f"{len(missing)} frames not written")
        self.partial[image_id] = partial
        planes = {k: p for k, p in frames.items() if p is not None}
        for writer in self.writers[image_id].values():
            blank = np.zeros((m.tile_height, m.tile_width), m.dtype.numpy)
            for key in missing:  # how this door finishes local files of a partial image
                writer.write_tile(key, blank)
            writer.add_planes(planes)
            writer.finish()

    def abort(self, image_id: UUID) -> Any:
        for writer in self.writers[image_id].values():
            writer.abort()

    def experiment(self, image_id: UUID) -> Any:
        backends = {
            "omero": BackendProgress(
                image_id=image_id,
                state="finished",
                frames_total=1,
                frames_written=1,
                frames_lost=0,
                location="omero:Image:11 dataset:5",
            )
        }
        return type("Progress", (), {"backends": backends})()

    def experiments(self) -> list[Any]:
        return []


@pytest.fixture
def door() -> Iterator[Door]:
    made = Door()
    root.configure(AdapterSettings(finalize_grace_s=0.05), edge=FrontDoorEdge(made))  # type: ignore[arg-type]
    yield made
    root.close()


def test_a_round_area_through_the_front_door(door: Door, tmp_path: Path) -> None:
    camera = Camera(24, 32)
    inside = lambda ix, iy: (ix - 1) ** 2 + (iy - 1) ** 2 <= 1  # noqa: E731
    points = area(100.0, 200.0, 3, 3, (32.0, 24.0), keep=inside)
    flags = {"write_zarr": True, "write_individual_tiffs": True}
    run = normal_mode(tmp_path, [points], camera, flags=flags, time_interval=5.0)
    assert run.refused == []
    writer = run.writers[0, 0]
    [m] = writer.manifests
    spec = door.specs[m.image_id]
    assert [t.kind for t in spec.targets or []] == ["ome_zarr_v04", "frame_tiffs"]
    assert spec.server is True and spec.key_values["time_interval_s"] == "5"
    assert door.partial[m.image_id] is True  # the holes: closed with the frames it has
    # Every frame's measured stage position and exposure reached the door as PlaneMeta.
    first = door.frames[m.image_id][TileKey(1, 0, 0, 0)]
    assert first == PlaneMeta(x_um=132.0, y_um=200.0, z_um=100.0, exposure_ms=20.0)
    scan = Scan(3, 3, 100.0, 200.0, (32.0, 24.0), 1.0, camera, 0, 0, 1, 1)
    check_live_zarr(Path(writer.store or ""), door.manifests[m.image_id], scan)
    folder = Path(writer.file_paths.base_dir)  # type: ignore[attr-defined]
    check_frame_tiffs(folder / "tiles", door.manifests[m.image_id], scan)
    assert (writer.get_omero_image_id(), writer.get_omero_dataset_id()) == (11, 5)


def test_a_frame_timestamp_becomes_its_delta_t(door: Door, tmp_path: Path) -> None:
    from tests.imswitch.imswitch_like import ImSwitchConfig, ImSwitchPaths
    from tilebridge_imswitch import OMEWriter

    writer = OMEWriter(
        ImSwitchPaths(str(tmp_path / "scan")), (8, 8), (1, 1), (0.0, 0.0, 8.0, 8.0),
        ImSwitchConfig(write_zarr=False),
    )  # fmt: skip
    frame = np.ones((8, 8), np.uint16)
    writer.write_frame(frame, {"x": 0.0, "y": 0.0, "timestamp": datetime.now(UTC).timestamp()})
    writer.finalize()
    [m] = writer.manifests
    plane = door.frames[m.image_id][TileKey(0)]
    assert plane is not None and plane.delta_t_s is not None and 0 <= plane.delta_t_s < 5
    assert door.partial[m.image_id] is False

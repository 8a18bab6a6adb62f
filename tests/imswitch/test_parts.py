"""The adapter's parts on their own: placement, reading ImSwitch's config objects, settings and
OMERO credentials, retries, and a local target that fails while the others carry on."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.imswitch.checks import Scan, check_live_zarr
from tests.imswitch.conftest import Agent
from tests.imswitch.imswitch_like import Camera, ImSwitchConfig, ImSwitchPaths, area, normal_mode
from tilebridge_imswitch import OMEFileStorePaths, OMEWriter, OMEWriterConfig, root
from tilebridge_imswitch.config import WriterConfig
from tilebridge_imswitch.edge_frontdoor import FrontDoorEdge
from tilebridge_imswitch.placement import Channels, Grid, ZPlanes
from tilebridge_imswitch.port import Edge, LocalTarget, Progress, Written
from tilebridge_imswitch.settings import AdapterSettings, connection_targets, setup_targets
from tilebridge_protocol.errors import PermanentError, TransientError

SECRET = "hunter2-omero-secret"

# -- placement ---------------------------------------------------------------------------------


@given(
    nx=st.integers(1, 12),
    ny=st.integers(1, 12),
    step=st.floats(1.0, 5000.0),
    start=st.floats(-1e5, 1e5),
    jitter=st.floats(-0.24, 0.24),
    data=st.data(),
)
def test_a_frame_near_a_planned_position_is_that_position(
    nx: int, ny: int, step: float, start: float, jitter: float, data: st.DataObject
) -> None:
    grid = Grid.of((nx, ny), (start, -start, step, step * 0.75), (step, step))
    index = data.draw(st.integers(0, nx * ny - 1))
    p = grid.positions()[index]
    assert grid.locate(p.x_um + jitter * step, p.y_um - jitter * step * 0.75) == index


def test_a_frame_between_positions_or_outside_is_refused() -> None:
    grid = Grid.of((3, 2), (0.0, 0.0, 100.0, 100.0), (64.0, 64.0))
    for x, y in ((50.0, 0.0), (0.0, 130.0), (300.0, 0.0), (-40.0, 0.0)):
        with pytest.raises(PermanentError, match="matches no planned position"):
            grid.locate(x, y)


def test_a_placeholder_step_is_the_tiles_extent() -> None:
    # ImSwitch's Lightsheet passes grid_geometry (0, 0, 0, 0); one column gets a step of 100.
    grid = Grid.of((2, 1), (0.0, 0.0, 0.0, 0.0), (51.2, 38.4))
    assert [(p.x_um, p.y_um) for p in grid.positions()] == [(0.0, 0.0), (51.2, 0.0)]


def test_channels_by_index_by_name_or_in_the_order_seen() -> None:
    named = Channels(2, ("LED", "Laser 488"))
    assert named.index(None, "Laser 488") == 1 and named.index(0, "whatever") == 0
    with pytest.raises(PermanentError, match="none of the channels"):
        named.index(None, "UV")
    seen = Channels(2, None)
    assert seen.names is None
    assert [seen.index(None, n) for n in ("led", "illumination0", "led")] == [0, 1, 0]
    assert seen.names == ("led", "illumination0")
    with pytest.raises(PermanentError, match="would be channel 3"):
        seen.index(None, "illumination1")
    with pytest.raises(PermanentError, match="outside the writer's 2 channels"):
        seen.index(2, None)
    indexed = Channels(3, None)
    assert indexed.index(2, "Laser 640") == 2  # a frame of the last channel first
    assert indexed.names is None
    assert indexed.settle() == ("C0", "C1", "Laser 640")


def test_z_planes_from_the_stage_z_when_no_index_is_given() -> None:
    planes = ZPlanes(3)
    assert [planes.index(None, z, 0, 0) for z in (50.0, 52.0, 54.0, 52.0)] == [0, 1, 2, 1]
    assert planes.index(None, 60.0, 1, 0) == 0  # another position starts its own stack
    with pytest.raises(PermanentError, match="outside the writer's 3 planes"):
        planes.index(None, 56.0, 0, 0)
    assert ZPlanes(1).index(None, None, 0, 0) == 0


# -- ImSwitch's config objects -----------------------------------------------------------------


def test_imswitchs_generated_channel_names_are_not_taken_as_names() -> None:
    assert WriterConfig.of(ImSwitchConfig(n_channels=2)).channel_names is None
    named = WriterConfig.of(ImSwitchConfig(n_channels=2, channel_names=["LED", "488"]))
    assert named.channel_names == ("LED", "488")
    assert WriterConfig.of(OMEWriterConfig(n_channels=2)).channel_names is None


def test_any_object_with_imswitchs_names_is_a_config() -> None:
    class Minimal:
        pixel_size = 0.65
        n_channels = 0  # performance mode with no illumination on
        channel_colors = ["#00ff00"]
        write_tiff = True

    cfg = WriterConfig.of(Minimal())
    assert (cfg.pixel_size_um, cfg.n_channels, cfg.write_tiff, cfg.write_zarr) == (
        0.65, 1, True, True,
    )  # fmt: skip
    assert cfg.channel_colors == ("00FF00",)
    with pytest.raises(PermanentError, match="pixel_size must be > 0"):
        WriterConfig.of(ImSwitchConfig(pixel_size=0))
    with pytest.raises(PermanentError, match="RRGGBB"):
        WriterConfig.of(ImSwitchConfig(channel_colors=["green"]))


def test_the_paths_class_is_imswitchs() -> None:
    paths = OMEFileStorePaths("/data/x/scan_0")
    assert (paths.base_dir, paths.tiff_dir, paths.zarr_dir) == (
        "/data/x/scan_0", "/data/x/scan_0/tiles", "/data/x/scan_0.ome.zarr",
    )  # fmt: skip


# -- settings and OMERO credentials ------------------------------------------------------------


def test_the_omero_password_of_imswitchs_setup_is_ignored_and_goes_nowhere(
    agent: Agent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = tmp_path / "setup.json"
    setup.write_text(
        json.dumps(
            {
                "experiment": {
                    "omeroServerUrl": "omero.example.org",
                    "omeroUsername": "scope",
                    "omeroPassword": SECRET,
                    "omeroProjectId": 12,
                    "omeroDatasetId": 34,
                    "omeroEnabled": True,
                }
            }
        )
    )
    with caplog.at_level(logging.DEBUG):
        targets = setup_targets(setup)
        root.configure(agent.settings(imswitch_setup=setup))
        params = type(
            "OMEROConnectionParams", (), {"host": "omero.example.org", "password": SECRET}
        )
        camera = Camera(16, 16)
        writer = OMEWriter(
            ImSwitchPaths(str(tmp_path / "scan")), (16, 16), (1, 1), (0.0, 0.0, 16.0, 16.0),
            ImSwitchConfig(), omero_connection_params=params(),
        )  # fmt: skip
        writer.write_frame(camera.snap(0), {"x": 0.0, "y": 0.0})
        writer.finalize()
    assert (targets.server, targets.project_id, targets.dataset_id, targets.enabled) == (
        "omero.example.org", 12, 34, True,
    )  # fmt: skip
    assert "holds an OMERO password: ignored" in caplog.text
    [m] = agent.manifests().values()
    assert m.key_values["imswitch_omero_dataset_id"] == "34"
    assert (m.omero_project_id, m.omero_dataset_id) == (12, 34)  # ImSwitch's target, by id
    everything = [caplog.text, m.to_bytes().decode(), repr(targets), repr(vars(writer))]
    everything += [repr(root.session()), json.dumps(targets.model_dump())]
    assert not [text for text in everything if SECRET in text]


def test_connection_params_are_read_duck_typed() -> None:
    targets = connection_targets({"host": "omero.lab", "dataset_id": 5, "password": ""})
    assert (targets.server, targets.dataset_id, targets.project_id) == ("omero.lab", 5, None)
    assert connection_targets(None).server is None


def test_settings_refuse_unknown_keys(tmp_path: Path) -> None:
    bad = tmp_path / "imswitch.json"
    bad.write_text(json.dumps({"edge": "fastpath", "omero_password": "x"}))
    with pytest.raises(ValueError, match="omero_password"):
        AdapterSettings.load(bad)


# -- faults --------------------------------------------------------------------------------


class Wrapped:
    """An `Edge` that hands every call to the agent's, over its fast path."""

    def __init__(self, agent: Agent) -> None:
        self.inner: Edge = FrontDoorEdge(agent.client())

    def open(self, manifest: Any, local: Sequence[LocalTarget]) -> None:
        self.inner.open(manifest, local)

    def write(self, image_id: Any, key: Any, pixels: Any, meta: Any) -> Written:
        return self.inner.write(image_id, key, pixels, meta)

    def close(self, image_id: Any, not_planned: Sequence[int], partial: bool) -> None:
        self.inner.close(image_id, not_planned, partial)

    def progress(self, image_id: Any) -> Progress:
        return self.inner.progress(image_id)

    def abort(self, image_id: Any) -> None:
        self.inner.abort(image_id)


class Flaky(Wrapped):
    """Says "try again" to the first `failures` writes (the agent's disk was full)."""

    def __init__(self, agent: Agent, failures: int) -> None:
        super().__init__(agent)
        self.failures = failures

    def write(self, image_id: Any, key: Any, pixels: Any, meta: Any) -> Written:
        if self.failures > 0:
            self.failures -= 1
            raise TransientError("edge agent: disk full, try again")
        return super().write(image_id, key, pixels, meta)


def test_a_frame_is_retried_while_the_agent_says_try_again(agent: Agent, tmp_path: Path) -> None:
    root.configure(agent.settings(retry_for_s=30), edge=Flaky(agent, failures=2))
    camera = Camera(16, 16)
    run = normal_mode(tmp_path, [area(0.0, 0.0, 2, 1, (16.0, 16.0))], camera)
    assert run.refused == []
    [image_id] = agent.manifests()
    assert len(agent.tiles(image_id)) == 2


def test_a_frame_refused_for_good_after_the_retry_time(agent: Agent, tmp_path: Path) -> None:
    root.configure(agent.settings(retry_for_s=0.3), edge=Flaky(agent, 10**6))
    writer = OMEWriter(str(tmp_path / "scan"), (8, 8), (1, 1), (0, 0, 8, 8), ImSwitchConfig())
    with pytest.raises(TransientError, match="try again"):
        writer.write_frame(np.ones((8, 8), np.uint16), {"x": 0.0, "y": 0.0})


def test_a_failing_local_target_is_reported_and_the_rest_carries_on(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tilebridge_storage import frame_tiffs

    def full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(frame_tiffs, "_write", full)
    camera = Camera(16, 16)
    points = area(0.0, 0.0, 2, 2, (16.0, 16.0))
    flags = {"write_zarr": True, "write_individual_tiffs": True}
    run = normal_mode(tmp_path, [points], camera, flags=flags)
    assert run.refused == []  # ImSwitch sees no error: the frames are safe in the agent
    writer = run.writers[0, 0]
    [progress] = writer.progress()
    assert progress.targets["frame_tiffs"].state == "failed"
    assert "No space left" in (progress.targets["frame_tiffs"].error or "")
    assert progress.targets["ome_zarr_v04"].state == "finished"
    [m] = writer.manifests
    assert len(agent.tiles(m.image_id)) == 4


class RefusesFirstOpen(Wrapped):
    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.opens = 0

    def open(self, manifest: Any, local: Sequence[LocalTarget]) -> None:
        self.opens += 1
        if self.opens == 1:
            raise PermanentError("edge agent refused starting the experiment: busy")
        super().open(manifest, local)


def test_an_open_the_agent_refused_is_tried_again_with_the_same_image(
    agent: Agent, tmp_path: Path
) -> None:
    edge = RefusesFirstOpen(agent)
    root.configure(agent.settings(), edge=edge)
    camera = Camera(16, 16)
    run = normal_mode(tmp_path, [area(0.0, 0.0, 2, 1, (16.0, 16.0))], camera)
    assert len(run.refused) == 1 and "busy" in run.refused[0]
    writer = run.writers[0, 0]
    [m] = writer.manifests
    assert list(agent.manifests()) == [m.image_id] and edge.opens == 2
    # The refused first frame left its grid cell empty: the store shows zeros there.
    assert len(agent.tiles(m.image_id)) == 1
    check_live_zarr(Path(writer.store or ""), m, scan_with_one_frame(camera, m))


def scan_with_one_frame(camera: Camera, m: Any) -> Scan:
    del camera.taken[0, 0, 0, 0, 0, 0]  # refused: the store shows zeros there
    return Scan(2, 1, 0.0, 0.0, (16.0, 16.0), 1.0, camera, 0, 0, 1, 1)

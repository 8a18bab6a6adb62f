"""The adapter over the agent's front door (its fast path, `conftest`): what it asks of the door,
and what ImSwitch's live view finds after each frame.

ImSwitch's live view (frontend/src/axon/ZarrTileView.js at the commit `imswitch_like` names)
re-reads the store as soon as `write_frame` returned chunk info: ExperimentController.py
:2007-2020 (`_on_success`) emits `sigUpdateOMEZarrStore` with `rel_chunk`, the frontend bumps
its version and viv's zarr loader fetches `.zattrs`, the arrays' `.zarray` and their chunk
files over HTTP. `read_like_the_live_view` does the same with plain file reads and the
codec the `.zarray` names."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from tests.imswitch.conftest import Agent
from tests.imswitch.imswitch_like import (
    Camera,
    ImSwitchConfig,
    ImSwitchPaths,
    area,
    normal_mode,
    performance_mode,
)
from tilebridge_imswitch import OMEWriter
from tilebridge_protocol.keys import TileKey
from tilebridge_storage.mosaic import plan


def read_like_the_live_view(store: Path, info: dict[str, Any]) -> np.ndarray[Any, Any]:
    """The canvas of the frame's plane, read as viv reads a NGFF 0.4 store: the multiscale
    in `.zattrs`, level 0's `.zarray`, then every chunk file, decoded by the codec named.
    Asserts the chunk `rel_chunk` names is one of them."""
    attrs = json.loads((store / ".zattrs").read_text())
    [dataset, *_] = attrs["multiscales"][0]["datasets"]
    level = store / dataset["path"]
    meta = json.loads((level / ".zarray").read_text())
    codec = numcodecs.get_codec(meta["compressor"])
    _, _, _, height, width = meta["shape"]
    chunk = meta["chunks"][-1]
    dtype = np.dtype(meta["dtype"])
    c, z = info["c_idx"], info["z_idx"]
    canvas = np.zeros((height, width), dtype)
    seen = []
    for row in range(-(-height // chunk)):
        for column in range(-(-width // chunk)):
            key = f"0/{c}/{z}/{row}/{column}"
            path = level / key
            if not path.exists():
                continue  # never written: the fill value (0)
            seen.append(f"{dataset['path']}/{key}")
            block = np.frombuffer(codec.decode(path.read_bytes()), dtype).reshape(chunk, chunk)
            y, x = row * chunk, column * chunk
            canvas[y : y + chunk, x : x + chunk] = block[: height - y, : width - x]
    assert info["rel_chunk"] in seen and set(info["chunks"]) <= set(seen)
    return canvas


def test_every_frame_is_in_the_store_when_imswitch_is_told(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(40, 48)
    points = area(0.0, 0.0, 3, 2, (48.0, 40.0))  # a snake
    base = tmp_path / "ExperimentController" / "20261201_101500" / "scan_0"
    base.parent.mkdir(parents=True)
    writer = OMEWriter(
        ImSwitchPaths(str(base)), (48, 40), (3, 2), (0.0, 0.0, 48.0, 40.0), ImSwitchConfig()
    )
    for n, point in enumerate(points):
        frame = camera.snap(point.ix, point.iy)
        info = writer.write_frame(frame, {"x": point.x, "y": point.y, "z": 1.0, "tile_index": n})
        [m] = writer.manifests
        index = point.iy * 3 + point.ix
        oy, ox = plan(m).offsets[index]
        canvas = read_like_the_live_view(Path(writer.store or ""), info)
        np.testing.assert_array_equal(canvas[oy : oy + 40, ox : ox + 48], frame)
        assert info["grid_pos"] == (point.ix, point.iy)
    writer.finalize()


def test_the_whole_manifest_travels_as_the_front_doors_fields(agent: Agent, tmp_path: Path) -> None:
    camera = Camera(24, 32)
    points = area(0.0, 0.0, 2, 2, (32.0, 24.0))
    well = {"wellRow": "B", "wellColumn": 2, "labwareLoadName": "plate-7"}
    run = normal_mode(
        tmp_path, [points], camera, n_times=2, sources=("LED", "Laser 488"),
        time_interval=45.0, well=well, flags={"write_zarr": True},
    )  # fmt: skip
    assert run.refused == []
    for t in range(2):
        [sent] = run.writers[t, 0].manifests
        stored = agent.app.spool.image(sent.image_id).manifest  # what the server gets
        assert stored == sent
        assert stored.channel_colors == ("00FF00", "FF0000")  # ImSwitch's default colours
        assert (stored.time_interval_s, stored.first_time_point) == (45.0, t)
        assert stored.well is not None and (stored.well.plate, stored.well.name) == (
            "plate-7", "B2",
        )  # fmt: skip
        assert "channel_colors" not in stored.key_values  # a field, not a key-value


def test_a_frame_timestamp_becomes_its_delta_t(agent: Agent, tmp_path: Path) -> None:
    writer = OMEWriter(
        ImSwitchPaths(str(tmp_path / "scan")), (8, 8), (1, 1), (0.0, 0.0, 8.0, 8.0),
        ImSwitchConfig(write_zarr=False),
    )  # fmt: skip
    frame = np.ones((8, 8), np.uint16)
    meta = {"x": 0.0, "y": 0.0, "exposure_ms": 12.5}
    writer.write_frame(frame, {**meta, "timestamp": datetime.now(UTC).timestamp()})
    writer.finalize()
    [m] = writer.manifests
    plane = agent.planes(m.image_id)[TileKey(0)]
    assert plane is not None and plane.delta_t_s is not None and 0 <= plane.delta_t_s < 5
    assert (plane.x_um, plane.y_um, plane.exposure_ms) == (0.0, 0.0, 12.5)
    close = agent.close(m.image_id)
    assert close is not None and close.planes()[TileKey(0)] == plane  # the server gets it


def test_the_omero_ids_are_answered_once_the_server_stored_the_image(
    agent: Agent, tmp_path: Path
) -> None:
    run = normal_mode(tmp_path, [area(0.0, 0.0, 1, 1, (16.0, 16.0))], Camera(16, 16))
    writer = run.writers[0, 0]
    assert writer.get_omero_image_id() is None  # not stored yet
    [image_id] = writer.image_ids
    # What the agent's publisher records when the ingest answers `complete`.
    locations = {"archive": "/srv/a.ome.tif", "omero": "omero:Image:41 dataset:9"}
    agent.app.spool.image_done(image_id, True, None, locations)
    assert (writer.get_omero_image_id(), writer.get_omero_dataset_id()) == (41, 9)


def test_a_stopped_performance_scan_is_partial_not_sparse(agent: Agent, tmp_path: Path) -> None:
    """Performance mode scans its whole grid and finalizes even when stopped
    (ExperimentController.py:2940-2976): frames that never came are missing, not unplanned."""
    camera = Camera(16, 16)
    run = performance_mode(tmp_path, camera, nx=3, ny=1, step=(16.0, 16.0, 1.0), stop_after=2)
    [m] = run.writers[0, 0].manifests
    close = agent.close(m.image_id)
    assert close is not None and close.partial and close.not_planned == ()
    assert close.tile_count == 2

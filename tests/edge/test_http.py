"""The local HTTP API: a whole scan posted frame by frame with every target on, checked with
independent readers; config, validation, auth, secrets, the `status` command."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import tifffile
import zarr
from ome_types import from_xml
from ome_zarr_models.v05.image import Image
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import free_port
from devtools.stack import wait_for
from edge_agent.app import EdgeApp
from edge_agent.client import EdgeApiError, EdgeClient
from edge_agent.http import check_binding, create_app, start_server
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from tests.edge.stack import Stack, running_stack, scan_spec
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, decode_close
from tilebridge_protocol.status import DeviceStatus
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_storage.mosaic import assemble, plan

Tiles = dict[TileKey, np.ndarray[Any, Any]]
TOKEN = "s3cret-token-4-tests"
SCAN = SyntheticScan(columns=3, rows=3, tile_size=256, channels=2, z_planes=2)

# -- independent readers of every target ----------------------------------------------------


def check_ome_tiff(folder: Path, m: OpenManifest, tiles: Tiles) -> None:
    files = sorted(folder.glob("*.ome.tif"))
    assert len(files) == len(m.positions)
    for position, path in zip(m.positions, files, strict=True):
        with tifffile.TiffFile(path) as tif:
            data = (
                tif.series[0]
                .asarray()
                .reshape(m.size_t, m.size_c, m.size_z, m.tile_height, m.tile_width)
            )
            ome = from_xml(tif.ome_metadata or "")
        image = ome.images[0]
        assert image.pixels.physical_size_x == m.pixel_size.x_um
        assert [c.name for c in image.pixels.channels] == list(m.channels)
        assert {(p.position_x, p.position_y) for p in image.pixels.planes} == {
            (position.x_um, position.y_um)
        }
        for key, pixels in tiles.items():
            if key.index == position.index:
                np.testing.assert_array_equal(data[key.t, key.c, key.z], pixels)


def canvas(m: OpenManifest, tiles: Tiles, t: int, c: int, z: int) -> np.ndarray[Any, Any]:
    return assemble(m, {k.index: v for k, v in tiles.items() if (k.t, k.c, k.z) == (t, c, z)})


def check_ome_zarr(path: Path, m: OpenManifest, tiles: Tiles) -> None:
    group = zarr.open_group(path, mode="r", zarr_format=3)
    Image.from_zarr(group)  # valid OME-NGFF metadata
    multiscale = group.attrs["ome"]["multiscales"][0]  # type: ignore[index,call-overload]
    datasets = multiscale["datasets"]
    assert len(datasets) >= 1
    level0 = group[datasets[0]["path"]]
    mosaic = plan(m)
    assert level0.shape == (m.size_t, m.size_c, m.size_z, mosaic.height, mosaic.width)
    for t, c, z in np.ndindex(m.size_t, m.size_c, m.size_z):
        np.testing.assert_array_equal(level0[t, c, z], canvas(m, tiles, t, c, z))  # type: ignore[index]


def check_stitched_tiff(path: Path, m: OpenManifest, tiles: Tiles) -> None:
    mosaic = plan(m)
    planes = (m.size_t, m.size_c, m.size_z)
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]  # every level readable
    assert len(levels) >= 2
    level0 = levels[0].reshape(*planes, mosaic.height, mosaic.width)
    for t, c, z in np.ndindex(*planes):
        np.testing.assert_array_equal(level0[t, c, z], canvas(m, tiles, t, c, z))


def check_archive(path: Path, m: OpenManifest, tiles: Tiles) -> None:
    """The server's copy: one OME series per position, every tile as sent."""
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == len(m.positions)
        for position in m.positions:
            data = (
                tif.series[position.index]
                .asarray()
                .reshape(m.size_t, m.size_c, m.size_z, m.tile_height, m.tile_width)
            )
            for key, pixels in tiles.items():
                if key.index == position.index:
                    np.testing.assert_array_equal(data[key.t, key.c, key.z], pixels)


def retained_status(stack: Stack) -> DeviceStatus:
    got: list[bytes] = []
    arrived = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        arrived.set()

    client.on_message = on_message
    client.connect(stack.broker.host, stack.broker.port)
    client.subscribe(device_topic(stack.app.device, DeviceTopic.STATUS), qos=1)
    client.loop_start()
    try:
        assert arrived.wait(10), "no retained device status"
    finally:
        client.loop_stop()
        client.disconnect()
    return DeviceStatus.model_validate_json(got[-1])


# -- the whole path -------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Stack, EdgeClient]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_stack(tmp_path, http_port=free_port(), http_token_file=token_file) as stack:
        url = f"http://127.0.0.1:{stack.settings.http_port}"
        with EdgeClient(url, token=TOKEN) as client:
            yield stack, client


@pytest.mark.slow
def test_a_scan_posted_over_http_lands_in_every_target(
    served: tuple[Stack, EdgeClient], tmp_path: Path
) -> None:
    stack, client = served
    config = client.set_config(
        write_tiff=True, write_zarr=True, write_stitched_tiff=True, write_omero=True,
        compression="zstd", output_dir=str(tmp_path / "out"), omero_project="scans-2026",
    )  # fmt: skip
    assert config["write_zarr"]
    wait_for(lambda: stack.app.publisher.settings.codec == 1, 5, "zstd on the wire")
    started = client.start_experiment(**scan_spec(SCAN))
    image_id = UUID(started["image_id"])
    assert started["frames_total"] == 36 and started["tile_bytes"] == 256 * 256 * 2
    manifest = stack.app.spool.manifest(image_id)
    assert manifest.project == "scans-2026"
    tiles = {k: SCAN.frame(k) for k in manifest.tile_keys()}
    for key, pixels in tiles.items():
        pos = manifest.positions[key.index]
        answer = client.write_frame(
            image_id, pixels, x=pos.x_um, y=pos.y_um, z_index=key.z,
            illuminationChannel=manifest.channels[key.c], exposure_ms=20.0,
        )  # fmt: skip
        assert answer["accepted"] and answer["tile"] == list(key)
    repeat = client.write_frame(image_id, tiles[TileKey(0)], tile_index=0)
    assert not repeat["accepted"] and "was accepted at" in repeat["reason"]
    with pytest.raises(EdgeApiError) as conflict:  # the same tile, other pixels
        client.write_frame(image_id, tiles[TileKey(1)], tile_index=0)
    assert conflict.value.status_code == 409 and "pixels" in conflict.value.message

    finalized = client.finalize(image_id, timeout=60)
    assert finalized["state"] == "finalized" and finalized["frames_received"] == 36
    progress = client.wait_stored(image_id, timeout=60)
    backends = progress["backends"]
    assert {
        n: (b["state"], b["frames_written"], b["frames_lost"]) for n, b in backends.items()
    } == {name: ("finished", 36, 0) for name in ("ome_tiff", "ome_zarr", "stitched_tiff", "omero")}

    check_ome_tiff(Path(backends["ome_tiff"]["location"]), manifest, tiles)
    check_ome_zarr(Path(backends["ome_zarr"]["location"]), manifest, tiles)
    check_stitched_tiff(Path(backends["stitched_tiff"]["location"]), manifest, tiles)
    archive = next(stack.archive.rglob(f"*_{image_id}.ome.tif"))
    assert str(archive) in backends["omero"]["location"]
    check_archive(archive, manifest, tiles)
    # The measured stage position of every frame went with the close manifest.
    close = json.loads(stack.app.spool.image(image_id).close or b"{}")
    assert all(d["meta"]["exposure_ms"] == 20.0 for d in close["digests"])

    # The same numbers in /status and on the retained device status topic.
    status = client.status()
    assert status["experiments"][0]["backends"] == backends
    assert TOKEN not in json.dumps(status)
    expected = {name: ("finished", 36) for name in backends}
    wait_for(
        lambda: {n: (b.state, b.frames_written) for n, b in retained_status(stack).backends.items()}
        == expected,
        15, "the retained device status to show the finished scan",
    )  # fmt: skip

    # `edge-agent status` reads the same from the running agent.
    config_file = tmp_path / "edge.json"
    config_file.write_text(
        json.dumps(
            {
                "http_port": stack.settings.http_port,
                "http_token_file": str(stack.settings.http_token_file),
            }
        )
    )
    shown = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--config", str(config_file), "status"],
        check=False, capture_output=True, text=True, timeout=60, env={"COLUMNS": "120", "PATH": ""},
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    for word in ("edge-test", "received", "ome_zarr", "stitched_tiff", "server acked", "36/36"):
        assert word in shown.stdout


# -- the API on its own ----------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[httpx.Client, EdgeApp]]:
    """The API of an agent that is never started (frames stay in its spool)."""
    agent = EdgeApp(
        AgentSettings(spool_dir=tmp_path / "spool", min_free_bytes=0, local_output_root=tmp_path)
    )
    agent.config.update({"output_dir": str(tmp_path / "out"), "write_omero": True})
    port = free_port()
    app = create_app(agent.acquisition, agent.config, agent.reporter, agent.receiving, TOKEN)
    server = start_server(app, "127.0.0.1", port)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            yield client, agent
    finally:
        server.should_exit = True
        agent.spool.close()


def test_config_get_set_and_the_imswitch_names(
    api: tuple[httpx.Client, EdgeApp], tmp_path: Path
) -> None:
    client, service = api
    assert client.get("/getOMEWriterConfig").json() == client.get("/config").json()
    answer = client.post("/setOMEWriterConfig", json={"write_zarr": True, "layout": "mosaic"})
    assert answer.status_code == 200 and answer.json()["write_zarr"] is True
    assert client.get("/config").json()["write_tiff"] is True  # other fields kept
    assert json.loads((tmp_path / "spool" / "omewriter.json").read_text())["write_zarr"] is True
    for body, field in [
        ({"max_bytes_in_flight": 5}, "max_bytes_in_flight"),
        ({"write_zar": True}, "write_zar"),
        ({"layout": "per_tile"}, "write_zarr"),
    ]:
        refused = client.post("/config", json=body)
        assert refused.status_code == 422
        assert field in refused.json()["message"]
    assert service.config.current().write_zarr and service.config.current().layout == "mosaic"


def test_output_dir_must_stay_under_the_local_output_root(
    api: tuple[httpx.Client, EdgeApp], tmp_path: Path
) -> None:
    client, service = api
    inside = client.post("/config", json={"output_dir": str(tmp_path / "out" / "scans")})
    assert inside.status_code == 200
    for outside in ("/etc", str(tmp_path.parent), str(tmp_path / "out" / ".." / ".." / "x")):
        refused = client.post("/setOMEWriterConfig", json={"output_dir": outside})
        assert refused.status_code == 422
        message = refused.json()["message"]
        assert "output_dir" in message and "local_output_root" in message
    link = tmp_path / "link"
    link.symlink_to("/etc")
    assert client.post("/config", json={"output_dir": str(link / "scans")}).status_code == 422
    # A refused update changes nothing.
    assert service.config.current().output_dir == tmp_path / "out" / "scans"
    assert client.get("/config").json()["output_dir"] == str(tmp_path / "out" / "scans")


def test_frames_are_validated_against_the_manifest(api: tuple[httpx.Client, EdgeApp]) -> None:
    client, _ = api
    spec = scan_spec(SyntheticScan(columns=2, rows=1, tile_size=32))
    bad_spec = client.post("/experiments", json={**spec, "tile_width": 0})
    assert bad_spec.status_code == 422 and "tile_width" in bad_spec.json()["message"]
    started = client.post("/experiments", json=spec)
    assert started.status_code == 201
    image_id = started.json()["image_id"]
    frames = f"/experiments/{image_id}/frames"
    frame = np.arange(32 * 32, dtype="<u2").tobytes()
    assert client.post(frames, params={"tile_index": 0}, content=frame[:-2]).status_code == 422
    assert client.post(frames, params={"tile_index": 0}, content=frame + b"xx").status_code == 413
    assert client.post(frames, params={"tile_index": 9}, content=frame).status_code == 422
    assert client.post(frames, params={"tile_index": -1}, content=frame).status_code == 422
    header = {"X-Frame-Metadata": "not json"}
    assert client.post(frames, content=frame, headers=header).status_code == 422
    unknown = client.post(f"/experiments/{UUID(int=1)}/frames", content=frame)
    assert unknown.status_code == 404
    assert client.get(f"/experiments/{image_id}").json()["frames_received"] == 0
    again = client.post("/experiments", json={**spec, "image_id": image_id})
    assert again.status_code == 200 and again.json()["resumed"]
    other = client.post("/experiments", json={**spec, "image_id": image_id, "tile_width": 16})
    assert other.status_code == 409 and other.json()["field"] == "tile_width"
    header = {"X-Frame-Metadata": json.dumps({"x": 0.0, "y": 0.0, "runningNumber": 1})}
    ok = client.post(frames, content=frame, headers=header)
    assert ok.status_code == 200 and ok.json()["tile"] == [0, 0, 0, 0]
    early = client.post(f"/experiments/{image_id}/finalize")
    assert early.status_code == 422 and "1 of 2 frames not written" in early.json()["message"]
    # A full spool: 503 and nothing accepted; when space is back, the same frame goes in.
    _, agent = api
    agent.spool.min_free_bytes = 1 << 62
    full = client.post(frames, params={"tile_index": 1}, content=frame)
    assert full.status_code == 503 and full.headers["retry-after"]
    assert client.get(f"/experiments/{image_id}").json()["frames_received"] == 1
    agent.spool.min_free_bytes = 0
    client.post(frames, params={"tile_index": 1}, content=frame)
    assert client.post(f"/experiments/{image_id}/finalize").json()["state"] == "finalized"
    late = client.post(frames, params={"tile_index": 1}, content=frame)
    assert late.status_code == 422 and "no more frames" in late.json()["message"]


def test_a_sparse_image_is_finalized_over_http(api: tuple[httpx.Client, EdgeApp]) -> None:
    client, agent = api
    spec = scan_spec(SyntheticScan(columns=3, rows=1, tile_size=32))
    image_id = client.post("/experiments", json=spec).json()["image_id"]
    frame = np.arange(32 * 32, dtype="<u2").tobytes()
    client.post(f"/experiments/{image_id}/frames", params={"tile_index": 1}, content=frame)
    finalize = f"/experiments/{image_id}/finalize"
    assert client.post(finalize, params={"not_planned": [0, 1]}).status_code == 422
    done = client.post(finalize, params={"not_planned": [0, 2]})
    assert done.status_code == 200 and not done.json()["partial"]
    close = decode_close(agent.spool.image(UUID(image_id)).close or b"")
    assert close.not_planned == (0, 2) and not close.partial and close.tile_count == 1


def test_the_token_is_required_and_never_shown(api: tuple[httpx.Client, EdgeApp]) -> None:
    client, _ = api
    bodies = []
    for path in ("/status", "/openapi.json", "/docs", "/config"):
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            refused = client.get(path, headers=headers)
            assert refused.status_code == 401, path
            bodies.append(refused.text)
    assert client.get("/status").status_code == 200
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/experiments/{image_id}/frames" in schema.json()["paths"]
    bodies += [schema.text, client.get("/status").text, client.get("/config").text]
    assert all(TOKEN not in body for body in bodies)


def test_no_token_means_loopback_only(tmp_path: Path) -> None:
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("0.0.0.0", "token")
    for host in ("0.0.0.0", "192.168.1.20", "scope-1.local"):
        with pytest.raises(PermanentError, match="http_token_file"):
            check_binding(host, None)
    # `edge-agent run` refuses to start that way, saying why.
    config = tmp_path / "edge.json"
    config.write_text(
        json.dumps(
            {
                "http_host": "0.0.0.0",
                "http_port": free_port(),
                "spool_dir": str(tmp_path / "spool"),
                "min_free_bytes": 0,
                "broker": {"port": free_port()},
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--config", str(config), "run"],
        check=False, capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""},
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert run.returncode == 2
    assert "http_token_file" in run.stderr


def test_client_reports_refusals_with_the_servers_message(
    api: tuple[httpx.Client, EdgeApp],
) -> None:
    http, _ = api
    client = EdgeClient(http=http)
    with pytest.raises(EdgeApiError, match="max_bytes_in_flight") as err:
        client.set_config(max_bytes_in_flight=1)
    assert err.value.status_code == 422

"""The OMERO stand-in as its own process: the unmodified omero-py client (through the OMERO
backend) writes into it over real Ice, its control API reports exactly what it holds, and
its faults (stop, crash mid-write, SIGSTOP) reach the client as they would from a real
server."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from devtools.broker import free_port
from devtools.chaos.standin import StandinProcess
from devtools.stack import wait_for
from tilebridge_protocol.errors import TransientError
from tilebridge_storage.mosaic import assemble
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.provenance import PROVENANCE_NS
from tilebridge_storage.omero_backend.settings import DevicePolicy, OmeroSettings
from tilebridge_storage.testing.manifests import make_manifest, make_tiles


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandinProcess]:
    process = StandinProcess(
        tmp_path, pyramid_threshold_px=50 * 50, pyramid_tile=(32, 16), port=free_port(),
        tcp_port=free_port(), control_port=free_port(),
    ).start()  # fmt: skip
    yield process
    process.close()


def backend_for(standin: StandinProcess, **overrides: object) -> OmeroBackend:
    ready = standin.ready
    values: dict[str, object] = {
        "host": "127.0.0.1", "port": ready["port"], "username": ready["user"],
        "password": SecretStr(ready["password"]), "group": ready["group"],
        "default_policy": DevicePolicy(may_create=True, may_create_project=True),
        "connect_timeout_s": 3.0, "call_timeout_s": 3.0,
    }  # fmt: skip
    values.update(overrides)
    return OmeroBackend(OmeroSettings(**values))  # type: ignore[arg-type]


def test_a_written_image_is_reported_pixel_for_pixel(standin: StandinProcess) -> None:
    manifest = make_manifest()
    tiles = make_tiles(manifest)
    backend = backend_for(standin)
    try:
        writer = backend.open_image("scope-1", manifest)
        for key in manifest.tile_keys():
            writer.write_tile(key, tiles[key])
        stored = writer.finish()
    finally:
        backend.close()
    [image] = standin.images()
    assert image["id"] == stored.ids["image"]
    assert image["state"] == "complete" and image["datasets"] == [stored.ids["dataset"]]
    assert image["map_annotations"][PROVENANCE_NS]["image_id"] == str(manifest.image_id)
    pixels = standin.pixels(image["id"])
    assert list(pixels.shape) == image["shape"]
    for key in tiles:
        plane = {k.index: v for k, v in tiles.items() if (k.z, k.c, k.t) == (key.z, key.c, key.t)}
        np.testing.assert_array_equal(pixels[key.t, key.c, key.z], assemble(manifest, plane))


def test_stop_refuses_connections_and_start_serves_again(standin: StandinProcess) -> None:
    backend = backend_for(standin)
    try:
        assert standin.action("stop")["running"] is False
        with pytest.raises(TransientError):
            backend.open_image("scope-1", make_manifest())
        assert standin.action("start")["running"] is True
        backend.open_image("scope-1", make_manifest()).abort()
    finally:
        backend.close()


def test_an_armed_crash_fires_mid_write_and_the_server_comes_back(
    standin: StandinProcess,
) -> None:
    manifest = make_manifest()
    tiles = make_tiles(manifest)
    backend = backend_for(standin)
    try:
        writer = backend.open_image("scope-1", manifest)
        assert standin.action("crash-after", set_tiles=1)["armed"] is not None
        with pytest.raises(TransientError):
            for key in manifest.tile_keys():
                writer.write_tile(key, tiles[key])
        # The crash stops the server from a thread of its own: it is down shortly after.
        state = wait_for(lambda: (s := standin.state()) and not s["running"] and s, 30, "down")
        assert state["crashed"] and state["armed"] is None
        writer.abort()
        standin.action("start")
        assert [i["state"] for i in standin.images()] == ["broken"]
    finally:
        backend.close()


def test_a_sigstopped_server_answers_nothing_until_sigcont(standin: StandinProcess) -> None:
    url = f"http://127.0.0.1:{standin.ready['control_port']}/state"
    standin.signal(signal.SIGSTOP)
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.get(url, timeout=1.0)
    finally:
        standin.signal(signal.SIGCONT)
    assert httpx.get(url, timeout=10).json()["running"] is True

"""The agent's HTTP API under attack (issue 11): DNS rebinding, oversized frames and
experiments, an output folder swapped for a symlink, routes without the token."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from devtools.broker import free_port
from edge_agent.acquisition import MAX_FRAMES_PER_EXPERIMENT
from edge_agent.app import EdgeApp
from edge_agent.http import allowed_hosts, create_app, start_server
from edge_agent.settings import AgentSettings

TOKEN = "hostile-test-token"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[httpx.Client, EdgeApp, int]]:
    settings = AgentSettings(
        spool_dir=tmp_path / "spool", min_free_bytes=0, local_output_root=tmp_path / "local",
        acquisition_memory_bytes=64 * 1024 * 1024,
    )  # fmt: skip
    agent = EdgeApp(settings)
    port = free_port()
    hosts = allowed_hosts(settings.http_allowed_hosts, "127.0.0.1")
    app = create_app(agent.acquisition, agent.config, agent.reporter, agent.receiving, TOKEN,
                     hosts)  # fmt: skip
    server = start_server(app, "127.0.0.1", port)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            yield client, agent, port
    finally:
        server.should_exit = True
        agent.spool.close()


def spec(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "experiment": "hostile", "tile_width": 16, "tile_height": 16, "pixel_size_um": 1.0,
        "positions": [{"x_um": 0, "y_um": 0}, {"x_um": 16, "y_um": 0}], "server": True,
        "targets": [],
    }  # fmt: skip
    return base | fields


def test_a_rebinding_page_is_refused_by_the_host_check(
    api: tuple[httpx.Client, EdgeApp, int],
) -> None:
    client, _, port = api
    for host in ("evil.example", "attacker.com:8710", f"192.168.1.20:{port}"):
        refused = client.get("/status", headers={"Host": host})
        assert refused.status_code == 400, host
    assert client.get("/status", headers={"Host": f"localhost:{port}"}).status_code == 200
    assert client.get("/status").status_code == 200  # 127.0.0.1:<port>


def test_every_route_wants_the_token(api: tuple[httpx.Client, EdgeApp, int]) -> None:
    client, _, _ = api
    anonymous = httpx.Client(base_url=str(client.base_url))
    with anonymous:
        for method, path in (
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/redoc"),
            ("GET", "/status"),
            ("POST", "/experiments"),
            ("GET", "/nothing"),
        ):
            assert anonymous.request(method, path).status_code == 401, path  # fmt: skip


def test_frames_and_experiments_beyond_the_memory_bound_are_refused(
    api: tuple[httpx.Client, EdgeApp, int],
) -> None:
    client, _agent, port = api
    huge = client.post("/experiments", json=spec(tile_width=65536, tile_height=65536,
                                                 dtype="float64"))  # fmt: skip
    assert huge.status_code == 422 and "tile_width" in huge.json()["message"]
    many = client.post("/experiments", json=spec(
        grid={"columns": 300, "rows": 200, "x_step_um": 16, "y_step_um": 16}, positions=None,
    ))  # fmt: skip
    assert many.status_code == 422 and str(MAX_FRAMES_PER_EXPERIMENT) in many.json()["message"]
    image_id = client.post("/experiments", json=spec()).json()["image_id"]
    frames = f"/experiments/{image_id}/frames"
    # Declared too big: refused before a byte of the body is read.
    declared = client.post(frames, params={"tile_index": 0}, content=b"\0" * 513,
                           headers={"Content-Length": "513"})  # fmt: skip
    assert declared.status_code == 413
    # A 1 GiB chunked body without a length: cut off after one frame's bytes, memory flat.
    rss = psutil.Process().memory_info().rss
    sent = _chunked_flood(port, f"{frames}?tile_index=0", 1 << 30)
    assert sent == 1 << 30 and b" 413 " in _last_answer.split(b"\r\n")[0]
    assert psutil.Process().memory_info().rss - rss < 64 * 1024 * 1024
    assert client.get(f"/experiments/{image_id}").json()["frames_received"] == 0


_last_answer = b""


def _chunked_flood(port: int, path: str, total: int) -> int:
    """Send up to `total` bytes as one chunked body; return how many went before the agent
    answered and closed."""
    global _last_answer
    piece = b"\0" * (1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}"
            "\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream"
            "\r\n\r\n".encode()
        )
        try:
            while sent < total:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sent += len(piece)
        except OSError:
            pass
        try:
            _last_answer = sock.recv(4096)
        except OSError:
            _last_answer = b""
    return sent


def test_an_output_folder_swapped_for_a_symlink_is_never_written_through(
    api: tuple[httpx.Client, EdgeApp, int], tmp_path: Path
) -> None:
    client, _agent, _ = api
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "local"
    checked = root / "scans"
    start = client.post("/experiments", json=spec(
        server=False, targets=[{"kind": "ome_tiff", "folder": str(checked)}],
    ))  # fmt: skip
    assert start.status_code == 201, start.text
    image_id = start.json()["image_id"]
    # After the check, the folder is swapped for a link to somewhere else.
    os.rename(checked, root / "scans.moved")
    checked.symlink_to(outside)
    frame = np.arange(256, dtype="<u2").tobytes()
    for index in (0, 1):
        answer = client.post(f"/experiments/{image_id}/frames", params={"tile_index": index},
                             content=frame)  # fmt: skip
        assert answer.status_code == 200, answer.text
    done = client.post(f"/experiments/{image_id}/finalize", params={"timeout": 30}).json()
    assert done["backends"]["ome_tiff"]["state"] == "finished", done
    assert list(outside.rglob("*")) == []
    assert list((root / "scans.moved").rglob("*.ome.tif"))
    # And a folder given through a symlink is refused outright.
    linked = client.post("/experiments", json=spec(
        server=False, targets=[{"kind": "ome_tiff", "folder": str(checked / "x")}],
    ))  # fmt: skip
    assert linked.status_code == 422 and "symlink" in linked.json()["message"]
    for folder in ("/etc", str(root / ".." / "outside")):
        refused = client.post("/experiments", json=spec(
            server=False, targets=[{"kind": "ome_tiff", "folder": folder}],
        ))  # fmt: skip
        assert refused.status_code == 422 and "local_output_root" in refused.json()["message"]

"""Issue 9's findings 1-7, reproduced through the real programs (`edge-agent run`,
`server-ingest run`) on a real Mosquitto, with the acquisition driven over the fast local
path as the ImSwitch adapter drives it; each used to fail and now cannot happen."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, agent_program, wait_for
from edge_agent.errors import ConflictError
from edge_agent.fastpath_client import FastPathClient
from edge_agent.models import ExperimentSpec
from edge_agent.simulate import SyntheticScan
from tests.end_to_end.conftest import assert_archive_intact, programs, start_ingest
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.keys import TileKey

SCAN = SyntheticScan(columns=3, rows=2, tile_size=64, channels=2)
FAST = {"commit_timeout_s": 2.0, "max_commit_timeout_s": 4.0, "status_interval_s": 0.5}
REPO = Path(__file__).resolve().parents[2]
__all__ = ["programs"]  # the end-to-end suite's fixture, used here too


class Agent:
    """`edge-agent run` as a process, and a fast-path client to it."""

    def __init__(self, broker: Mosquitto, root: Path, **settings: Any) -> None:
        self.program: Program = agent_program(broker, root, **(FAST | settings))
        self.socket = Path(self.program.config["spool_dir"]) / "acquire.sock"
        self.clients: list[FastPathClient] = []

    def start(self) -> FastPathClient:
        self.socket.unlink(missing_ok=True)
        self.program.start("run")
        wait_for(self.socket.exists, 30, f"the agent's socket\n{self.program.log_tail()}")
        self.clients.append(FastPathClient(self.socket, timeout=30))
        return self.clients[-1]

    def kill(self) -> None:
        self.program.kill()
        for client in self.clients:
            client.close()

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", "--config", str(self.program.config_path),
             "experiments", *args],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
            env={"COLUMNS": "200", "PATH": ""},
        )  # fmt: skip


@pytest.fixture
def agent(broker: Mosquitto, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(broker, tmp_path)
    yield a
    a.kill()


def spec(**fields: Any) -> dict[str, Any]:
    base = ExperimentSpec.from_manifest(SCAN.manifest()).model_dump(mode="json")
    values = {k: v for k, v in base.items() if k not in ("acquired_at", "image_id")}
    return values | {"targets": [], "server": True} | fields


def post(client: FastPathClient, image_id: UUID, key: TileKey, pixels: Any = None) -> Any:
    frame = SCAN.frame(key) if pixels is None else pixels
    return client.write_frame(image_id, frame, tile_index=key.index, channel_index=key.c)


def wait_server(client: FastPathClient, image_id: UUID, timeout: float = 60) -> Any:
    return wait_for(
        lambda: (p := client.experiment(image_id)).server != "sending" and p, timeout,
        "the server's answer",
    )  # fmt: skip


@pytest.mark.slow
def test_kill_9_between_frames_and_during_finalize_then_resume_without_acquired_at(
    broker: Mosquitto, agent: Agent, programs: dict[str, Program], tmp_path: Path
) -> None:
    """Findings 1 (resume), 2 (experiments in memory only) and 3 (repeats not reported)."""
    start_ingest(programs, broker, tmp_path)
    keys = SCAN.manifest().tile_keys()
    client = agent.start()
    first = client.start(spec())
    image_id, acquired_at = first.image_id, first.spec.acquired_at
    assert not first.resumed and acquired_at is not None
    status = client.status()
    instances = {status.agent_instance}
    written = 0
    for kill_after in (1, 5, len(keys)):  # between frames, and after the last one
        for key in keys[written:kill_after]:
            assert post(client, image_id, key).accepted
        written = kill_after
        agent.kill()
        client = agent.start()
        instances.add(client.status().agent_instance)
        # The same start again, without acquired_at: resumed, the stored spec returned whole.
        again = client.start(spec(image_id=str(image_id)))
        assert again.resumed and again.spec.acquired_at == acquired_at
        assert again.spec == first.spec and again.frames_received == written
        # Repeats of accepted frames are answered, not re-accepted, after the restart too.
        repeat = post(client, image_id, keys[0])
        assert not repeat.accepted and "was accepted at" in (repeat.reason or "")
        with pytest.raises(ConflictError) as conflict:
            post(client, image_id, keys[0], np.zeros((64, 64), "<u2"))
        assert conflict.value.field == "pixels"
    assert len(instances) == 4  # /status tells a restarted agent apart
    with pytest.raises(ConflictError) as field:
        client.start(spec(image_id=str(image_id), pixel_size_um=0.5))
    assert field.value.field == "pixel_size_um"

    # Killed during finalize: the close is durable or not yet made; finalize again is the same.
    closing = threading.Thread(target=lambda: _quietly(client.finalize, image_id))
    closing.start()
    agent.kill()
    closing.join(30)
    client = agent.start()
    closed = client.finalize(image_id)
    assert closed.state == "finalized" and closed.frames_received == len(keys)
    done = wait_server(client, image_id)
    assert done.server == "complete" and done.backends["omero"].frames_written == len(keys)
    assert_archive_intact(tmp_path, SCAN)

    # It still answers after another restart (finding 2), and says the same.
    agent.kill()
    client = agent.start()
    assert client.experiment(image_id) == done.model_copy()
    listed = agent.command("list")
    assert listed.returncode == 0 and str(image_id) in listed.stdout, listed.stderr


def _fill(path: Path) -> None:
    """Write `path` until its file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _quietly(call: Any, *args: Any) -> None:
    with contextlib.suppress(TransientError, PermanentError):
        call(*args)


@pytest.mark.slow
def test_a_full_spool_answers_503_then_the_scan_completes_when_space_is_back(
    broker: Mosquitto, programs: dict[str, Program], tmp_path: Path
) -> None:
    """Finding 4: a full disk used to end the server stream silently, answering accepted."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], capture_output=True,
        check=False,
    )  # fmt: skip
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr!r}"
    agent = Agent(broker, tmp_path, spool_dir=str(spool))
    try:
        start_ingest(programs, broker, tmp_path)
        client = agent.start()
        image_id = client.start(spec()).image_id
        keys = SCAN.manifest().tile_keys()
        for key in keys[:3]:
            assert post(client, image_id, key).accepted
        ballast = spool / "ballast"
        _fill(ballast)
        with pytest.raises(TransientError, match=r"No space left|spool disk full"):
            for key in keys[3:]:
                post(client, image_id, key)
        refused = client.status()
        assert refused.last_error and "frame" in refused.last_error
        ballast.unlink()
        for key in keys[3:]:
            post(client, image_id, key)  # accepted now, or accepted before the disk filled
        assert client.experiment(image_id).frames_received == len(keys)
        client.finalize(image_id)
        assert wait_server(client, image_id).server == "complete"
        assert client.status().last_error is None  # the condition cleared, so did the error
        assert_archive_intact(tmp_path, SCAN)
    finally:
        agent.kill()
        subprocess.run(["umount", "-l", str(spool)], check=False)


@pytest.mark.slow
def test_a_refused_image_shows_refused_and_the_error_clears_after_a_good_one(
    broker: Mosquitto, agent: Agent, programs: dict[str, Program], tmp_path: Path
) -> None:
    """Findings 5 (a refused image reported as acknowledged) and 6 (a stale last_error)."""
    client = agent.start()  # the ingest is not up yet: everything waits in the spool
    big = client.start(spec())  # 64 x 64 uint16 = 8192 bytes: fits
    small_scan = SyntheticScan(columns=1, rows=1, tile_size=96, seed=4)
    m = small_scan.manifest()
    refused = client.start(
        ExperimentSpec.from_manifest(m, targets=[], server=True).model_dump(mode="json")
    )
    client.write_frame(refused.image_id, small_scan.frame(TileKey(0)), tile_index=0)
    client.finalize(refused.image_id)
    start_ingest(programs, broker, tmp_path, limits={"max_tile_bytes": 8192})
    answer = wait_server(client, refused.image_id)
    assert answer.server == "refused"
    omero = answer.backends["omero"]
    assert omero.state == "failed" and omero.frames_written == 0 and omero.frames_lost == 1
    assert "quota_exceeded" in (omero.error or "")
    assert "refused" in (client.status().last_error or "")
    assert (tmp_path / "spool" / "rejected" / str(refused.image_id) / "tiles").is_dir()
    for key in SCAN.manifest().tile_keys():
        post(client, big.image_id, key)
    client.finalize(big.image_id)
    assert wait_server(client, big.image_id).server == "complete"
    wait_for(lambda: client.status().last_error is None, 10, "the stale error to clear")


@pytest.mark.slow
def test_an_abandoned_experiment_is_ended_by_the_policy_and_by_the_command(
    broker: Mosquitto, programs: dict[str, Program], tmp_path: Path
) -> None:
    """Finding 7: an experiment whose acquisition died before finalize never ended."""
    start_ingest(programs, broker, tmp_path)
    watcher = Watcher(broker, "tilebridge/v1/dev/+/close", "tilebridge/v1/dev/+/status")
    agent = Agent(broker, tmp_path, abandoned={"after_s": 8.0, "action": "partial"})
    try:
        client = agent.start()
        keys = SCAN.manifest().tile_keys()
        left = client.start(spec())
        for key in keys[:4]:
            post(client, left.image_id, key)
        # The acquisition program dies here. Meanwhile a second one is ended by hand.
        other = client.start(spec(experiment="second"))
        post(client, other.image_id, keys[0])
        aborted = agent.command("abort", str(other.image_id))
        assert aborted.returncode == 0 and "aborted" in aborted.stdout, aborted.stderr
        assert client.experiment(other.image_id).state == "aborted"

        ended = wait_for(
            lambda: (p := client.experiment(left.image_id)).state != "acquiring" and p, 60,
            "the abandoned policy",
        )  # fmt: skip
        assert ended.partial and ended.ended_by and "abandoned" in ended.ended_by
        close = wait_for(
            lambda: watcher.latest("tilebridge/v1/dev/scope-1/close"), 10, "the partial close"
        )
        assert close["partial"] is True and close["tile_count"] == 4
        assert [d["tile"] for d in close["digests"]] == [list(k) for k in keys[:4]]
        # The status lists an experiment while it is open or still being sent, so the one
        # that says it was ended may already be followed by one without it (complete).
        summaries = wait_for(
            lambda: [
                e for s in watcher.all("dev/scope-1/status") for e in s["experiments"]
                if e["image_id"] == str(left.image_id) and e["ended_by"]
            ],
            15, "the ended experiment on the status topic",
        )  # fmt: skip
        assert summaries[0]["partial"] is True and "abandoned" in summaries[0]["ended_by"]
    finally:
        watcher.close()
        agent.kill()


def test_the_fast_path_client_needs_no_server_side_package(tmp_path: Path) -> None:
    """The ImSwitch adapter installs only the client (and numpy): importing it must not
    pull in the HTTP, broker, queue or storage libraries."""
    code = (
        "import sys, json; import edge_agent.fastpath_client, edge_agent.frontdoor;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi','uvicorn','httpx','paho','persistqueue','tifffile','zarr','omero',"
        "'tilebridge_storage','server_ingest','starlette'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)  # fmt: skip
    assert json.loads(out.stdout) == []

"""The OMERO stand-in as its own process (`python -m tests.omero_standin serve`), and a
client of its control API: the faults it takes and what it holds, for the verification.

The ingest reaches it like a real OMERO: through its `omero` backend, unmodified omero-py,
real Ice. The stand-in keeps its data in memory, so the process itself is never killed
during a run (a real server's database would survive that); a crash is its crash hook,
which drops every connection mid-call and breaks pixel passes in progress.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]


class StandinProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        pyramid_threshold_px: int,
        pyramid_tile: tuple[int, int],
        port: int,
        tcp_port: int,
        control_port: int,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.workdir / "ready.json"
        self.log_path = self.workdir / "omero-standin.log"
        self.args = [
            "--port",
            str(port),
            "--tcp-port",
            str(tcp_port),
            "--control-port",
            str(control_port),
            "--ready-file",
            str(self.ready_file),
            "--pyramid-threshold-px",
            str(pyramid_threshold_px),
            "--pyramid-tile",
            f"{pyramid_tile[0]}x{pyramid_tile[1]}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._http: httpx.Client | None = None

    # -- the process ------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> StandinProcess:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.omero_standin", "serve", *self.args],
                cwd=REPO,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the OMERO stand-in did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        self.ready = json.loads(self.ready_file.read_text())
        self._http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.ready['control_port']}", timeout=30
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- the control API --------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        if self._http is None:
            raise RuntimeError("the OMERO stand-in is not started")
        return self._http

    def action(self, name: str, **params: Any) -> dict[str, Any]:
        """stop, start, crash, crash-after (set_tiles=N), disarm; returns the new state."""
        response = self._client().post(f"/{name}", params=params)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def state(self) -> dict[str, Any]:
        response = self._client().get("/state")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def images(self) -> list[dict[str, Any]]:
        response = self._client().get("/images")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def pixels(self, image_id: int) -> np.ndarray[Any, Any]:
        response = self._client().get(f"/images/{image_id}/pixels")
        response.raise_for_status()
        array: np.ndarray[Any, Any] = np.load(io.BytesIO(response.content), allow_pickle=False)
        return array

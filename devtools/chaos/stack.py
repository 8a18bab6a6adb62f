"""The system under test, as an admin runs it: Mosquitto from the repo's config, the
`server-ingest` and two `edge-agent run` programs (console commands, JSON configs), and the
OMERO stand-in process the ingest's `omero` backend reaches over real Ice.

The ingest's data directory and each agent's spool are small real filesystems (disks.py).
Settings are production's except where a chaos run needs faster clocks (commit timeouts,
store retries, status intervals) and small chunks (so tiles span one and two chunks).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.broker import Mosquitto, free_port
from devtools.chaos.disks import SmallDisk
from devtools.chaos.plan import DEVICES
from devtools.chaos.standin import StandinProcess
from devtools.stack import Program, broker_config

MiB = 1024 * 1024
LAYOUTS = {DEVICES[0]: "mosaic", DEVICES[1]: "per_tile"}
PYRAMID_THRESHOLD_PX = 300 * 300
"""Mosaics above 300 x 300 px are written as OMERO pyramids (one ordered pass, which a crash
breaks), smaller ones and per-tile images plane by plane: both write paths meet faults."""
PYRAMID_TILE = (64, 64)
CHUNK_SIZE = 64 * 1024
WIDE_LOGS = {"COLUMNS": "200"}
"""rich wraps log lines at the terminal width: wide lines keep a message on one line."""


class Part:
    """One supervised process: what faults do to it, and whether it ended on its own."""

    name: str

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pid(self) -> int | None:
        raise NotImplementedError

    def exit_code(self) -> int | None:
        """The exit status if the process is gone, else None."""
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.pid() is not None and self.exit_code() is None

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        pid = self.pid()
        if pid is not None and self.exit_code() is None:
            os.killpg(pid, sig)


class ProgramPart(Part):
    def __init__(self, program: Program, *args: str) -> None:
        self.program = program
        self.name = program.name
        self.args = args
        self._last: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:  # a second process would orphan the first one
            raise RuntimeError(f"{self.name} is running already")
        self.program.start(*self.args)
        self._last = self.program.proc

    def kill(self) -> None:
        self.resume()  # a stopped process would take SIGKILL too; its group might not
        self.program.kill()

    def stop(self) -> None:
        self.resume()
        self.program.stop()

    def pid(self) -> int | None:
        return self._last.pid if self._last is not None else None

    def exit_code(self) -> int | None:
        return self._last.poll() if self._last is not None else 0

    def log_tail(self, lines: int = 40) -> str:
        return self.program.log_tail(lines)


class BrokerPart(Part):
    name = "broker"

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self._last: subprocess.Popen[bytes] | None = None

    @property
    def persistence_file(self) -> Path:
        return self.broker.workdir / "data" / "mosquitto.db"

    def start(self) -> None:
        if self.running:
            raise RuntimeError("mosquitto is running already")
        self.broker.start()
        self._last = self.broker.proc

    def kill(self) -> None:
        self.resume()
        self.broker.kill()

    def stop(self) -> None:
        self.resume()
        self.broker.stop()

    def wipe(self) -> None:
        """Delete the persistence file: sessions, queued messages and retained status go."""
        self.persistence_file.unlink(missing_ok=True)

    def pid(self) -> int | None:
        return self._last.pid if self._last is not None else None

    def exit_code(self) -> int | None:
        return self._last.poll() if self._last is not None else 0

    def log_tail(self, lines: int = 40) -> str:
        return self.broker.log_tail(lines)


@dataclass
class ChaosStack:
    workdir: Path
    ingest_disk_bytes: int
    spool_bytes: int
    broker: BrokerPart = field(init=False)
    omero: StandinProcess = field(init=False)
    ingest: ProgramPart = field(init=False)
    agents: dict[str, ProgramPart] = field(init=False)
    ingest_disk: SmallDisk = field(init=False)
    spools: dict[str, SmallDisk] = field(init=False)
    http_ports: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.broker = BrokerPart(Mosquitto(self.workdir / "broker"))
        self.omero = StandinProcess(
            self.workdir / "omero",
            pyramid_threshold_px=PYRAMID_THRESHOLD_PX,
            pyramid_tile=PYRAMID_TILE,
            port=free_port(),
            tcp_port=free_port(),
            control_port=free_port(),
        )
        self.ingest_disk = SmallDisk(self.workdir / "ingest-data", self.ingest_disk_bytes)
        self.spools = {d: SmallDisk(self.workdir / f"spool-{d}", self.spool_bytes) for d in DEVICES}
        self.http_ports = {d: free_port() for d in DEVICES}

    @property
    def programs_dir(self) -> Path:
        return self.workdir / "programs"

    def parts(self) -> dict[str, Part]:
        parts: list[Part] = [self.broker, self.ingest, *self.agents.values()]
        return {part.name: part for part in parts}

    def agent_url(self, device: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[device]}"

    def start(self) -> None:
        """Mount the disks, start every part; returns once each one is started (the caller
        waits for readiness, which needs the broker's view)."""
        for disk in [self.ingest_disk, *self.spools.values()]:
            disk.mount()
        self.broker.start()
        self.omero.start()
        password = self.workdir / "secrets" / "omero-password"
        password.parent.mkdir(parents=True, exist_ok=True)
        password.touch(mode=0o600)
        password.write_text(self.omero.ready["password"])
        self.ingest = ProgramPart(
            Program(
                "server_ingest",
                self._ingest_config(password),
                self.programs_dir,
                "ingest",
                env=WIDE_LOGS,
            ),
            "run",
        )
        self.agents = {
            d: ProgramPart(
                Program(
                    "edge_agent",
                    self._agent_config(d),
                    self.programs_dir,
                    f"agent-{d}",
                    env=WIDE_LOGS,
                ),
                "run",
            )
            for d in DEVICES
        }
        self.ingest.start()
        for agent in self.agents.values():
            agent.start()

    def _ingest_config(self, password: Path) -> dict[str, Any]:
        ready = self.omero.ready
        return {
            "instance": "ingest-1",
            "broker": broker_config(self.broker.broker),
            "data_dir": str(self.ingest_disk.path),
            "backends": ["archive", "omero"],
            "omero": {
                "host": "127.0.0.1",
                "port": ready["port"],
                "username": ready["user"],
                "password_file": str(password),
                "group": ready["group"],
                "default_policy": {"may_create": True, "may_create_project": True},
                "connect_timeout_s": 3.0,
                "call_timeout_s": 5.0,
                "keepalive_s": 5.0,
            },
            "status_interval_s": 1.0,
            "store_retry_s": 1.0,
            "store_retry_max_s": 5.0,
            # The defaults (refuse new images below 4 GiB free, chunks below 1 GiB) are
            # for a real staging disk; on this small one the same policy, scaled down, so
            # the disk-full faults meet it (`unavailable`) and raw ENOSPC alike.
            "retention": {
                "reserve_bytes": max(2 * MiB, self.ingest_disk_bytes // 16),
                "floor_bytes": max(MiB, self.ingest_disk_bytes // 64),
                "check_interval_s": 1.0,
            },
        }

    def _agent_config(self, device: str) -> dict[str, Any]:
        return {
            "device_id": device,
            "broker": broker_config(self.broker.broker),
            "spool_dir": str(self.spools[device].path),
            "min_free_bytes": MiB,
            "chunk_size": CHUNK_SIZE,
            "commit_timeout_s": 3.0,
            "max_commit_timeout_s": 10.0,
            "status_interval_s": 1.0,
            "http_port": self.http_ports[device],
            "local_output_root": str(self.workdir / "edge-output" / device),
        }

    def close(self) -> None:
        """Stop everything whatever state it is in (paused parts are resumed first), then
        unmount. Safe to call twice."""
        for part in [*getattr(self, "agents", {}).values(), getattr(self, "ingest", None)]:
            if part is not None:
                part.stop()
        self.broker.stop()
        self.omero.close()
        for disk in [self.ingest_disk, *self.spools.values()]:
            if disk.mounted:
                disk.release()
            disk.unmount()

    def snapshot_logs(self, target: Path) -> None:
        """Keep the logs where they survive the unmount (they are outside the disks already;
        this collects them in one folder for a report)."""
        target.mkdir(parents=True, exist_ok=True)
        for log in [
            *self.programs_dir.glob("*.log"),
            self.broker.broker.log_path,
            self.omero.log_path,
        ]:
            if log.exists():
                shutil.copy2(log, target / log.name)

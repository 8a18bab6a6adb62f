"""Several real `server-ingest` processes on one Mosquitto and one PostgreSQL, sharing the
staging and archive folders (as several hosts would over a shared file system), and real
`edge-agent` processes acquiring simulated scans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, agent_program, broker_config, wait_for
from edge_agent.simulate import SyntheticScan

LEASE_S = 4.0
SCAN = {"columns": 3, "rows": 3, "tile_size": 256, "channels": 2}
FAST_RETRY = {"commit_timeout_s": 2.0, "max_commit_timeout_s": 4.0}


class Cluster:
    def __init__(self, broker: Mosquitto, dsn: str, workdir: Path, **settings: Any) -> None:
        self.broker, self.dsn, self.workdir = broker, dsn, workdir
        self.settings = settings
        self.ingests: dict[str, Program] = {}
        self.agents: dict[str, Program] = {}

    def ingest(self, name: str) -> Program:
        config: dict[str, Any] = {
            "instance": name,
            "broker": broker_config(self.broker),
            "data_dir": str(self.workdir / name),
            "staging_root": str(self.workdir / "staging"),
            "archive_dir": str(self.workdir / "archive"),
            "status_interval_s": 1.0,
            "store_retry_s": 0.5,
            "store_retry_max_s": 2.0,
            "ledger": {"kind": "postgres", "dsn": self.dsn},
            "cluster": {"subscription": "shared", "lease_s": LEASE_S},
        }
        config.update(self.settings)
        program = self.ingests[name] = Program("server_ingest", config, self.workdir, name)
        return program

    def start_ingests(self, *names: str) -> None:
        watcher = Watcher(self.broker, "tilebridge/v1/ingest/+/status")
        try:
            for name in names:
                self.ingest(name).start("run")
            for name in names:
                topic = f"tilebridge/v1/ingest/{name}/status"
                wait_for(
                    lambda t=topic: (watcher.latest(t) or {}).get("broker_connected"),
                    30,
                    f"{name} online",
                )
        finally:
            watcher.close()

    def scan(self, n: int, **shape: int) -> SyntheticScan:
        return SyntheticScan(**{**SCAN, **shape}, seed=n)

    def start_agent(
        self, n: int, frame_delay: float = 0.0, shape: dict[str, int] | None = None, **settings: Any
    ) -> Program:
        name = f"agent-{n}"
        program = agent_program(
            self.broker,
            self.workdir,
            name=name,
            device_id=f"scope-{n}",
            spool_dir=str(self.workdir / f"spool-{n}"),
            **{**FAST_RETRY, **settings},
        )
        scan = {**SCAN, **(shape or {})}
        args = [f"--{k.replace('_', '-')}" for k in scan]
        values = [str(v) for v in scan.values()]
        program.start(
            "simulate",
            *[x for pair in zip(args, values, strict=True) for x in pair],
            "--seed", str(n), "--timeout", "150", "--frame-delay", str(frame_delay),
            "--summary", str(self.workdir / f"{name}.summary.json"),
        )  # fmt: skip
        self.agents[name] = program
        return program

    def summary(self, n: int) -> dict[str, Any]:
        return dict(json.loads((self.workdir / f"agent-{n}.summary.json").read_text()))

    def wait_agents(self, timeout: float = 170) -> None:
        for name, agent in self.agents.items():
            code = agent.wait(timeout)
            assert code == 0, f"{name} exited {code}:\n{agent.log_tail()}\n{self.logs()}"

    def holder(self, kind: str, name_like: str) -> str | None:
        with psycopg.connect(self.dsn) as db:
            row = db.execute(
                "SELECT holder FROM claims WHERE kind = %s AND name LIKE %s AND expires > now()",
                (kind, name_like),
            ).fetchone()
        return str(row[0]) if row else None

    def phases(self) -> dict[tuple[str, UUID], str]:
        with psycopg.connect(self.dsn) as db:
            rows = db.execute("SELECT device, image_id, phase FROM images").fetchall()
        return {(d, i): p for d, i, p in rows}

    def tiles_recorded(self) -> dict[tuple[str, UUID], int]:
        with psycopg.connect(self.dsn) as db:
            rows = db.execute(
                "SELECT device, image_id, count(*) FROM tiles GROUP BY device, image_id"
            ).fetchall()
        return {(d, i): n for d, i, n in rows}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log_tail(25)}" for name, p in self.ingests.items())

    def stop(self) -> None:
        for program in [*self.agents.values(), *self.ingests.values()]:
            program.kill()

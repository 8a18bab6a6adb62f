"""The hostile suite's harness: attacks by a holder of one valid identity, against a broker
configured as in production and the real programs.

Each test gets a fresh world from the `hostile` fixture (a `Hostile`):

- `hostile.broker`: a real Mosquitto in secured mode with production's policy, i.e. the
  listeners of `mosquitto/mosquitto.conf` rendered on free loopback ports
  (devtools/broker_config.py: client ids bound to usernames, the TLS listener requiring a
  client certificate of the lab CA), the production ACL `mosquitto/acl`, and a password file
  holding `ingest`, `monitor` and two devices: `GOOD` (scope-good, the well-behaved
  microscope) and `EVIL` (scope-evil, the attacker's one valid identity), both with client
  certificates (`hostile.tls(name)`). One more identity, `monitor-harness`, is the harness's
  own status reader (a `monitor-<n>` identity exactly as `server-ingest device add --role
  monitor` makes it), so `monitor` is free for attacks: one identity is one connection.
- `hostile.start_ingest(**settings)`: the real `server-ingest run` (devtools.stack.Program)
  as `ingest` on the loopback listener, its password in a 0600 file, data in
  `hostile.sandbox.ingest_data`; returns the Program once the ingest reports itself online
  (also `hostile.ingest` afterwards). `hostile.ingest_status()` is its latest status.
- `hostile.scan(**options) -> ScanResult`: GOOD acquires a synthetic tile scan with the real
  `edge-agent simulate`, over TLS with certificate and password, and reports its exit code,
  final state and how long it took (`seconds`: wall clock from process start to exit,
  Python start-up included). `hostile.start_scan(...)` runs one in the background and
  `.result()` waits for it. Each scan is a new image (its own seed). Agent settings are
  keyword arguments (default: re-send after 2 s, so a dropped tile comes back quickly).
- `hostile.agent_config(device, **settings)` and `hostile.program(module, config, name)`: any
  other program run the same way (its cwd, HOME and TMPDIR in the sandbox), e.g. EVIL's
  `edge-agent run` with its HTTP API (`http_port=`).
- `hostile.client(identity, **kw) -> Probe` (tests.security.conftest.Probe, not yet
  connected): a raw MQTT 5 client for what the programs never send; plain TCP unless
  `tls=hostile.tls(identity)`; `client_id=`, `session_expiry=` to pose as a service.
- `hostile.status`: a Watcher (devtools.stack) on every status topic, as `monitor-harness`.
- `hostile.rss(program) -> RssSampler`: `with` it around an attack; `.peak` is the largest
  resident set size seen (psutil, sampled every 50 ms). `INGEST_RSS_BOUND` is the bound the
  suite holds the ingest to.
- `hostile.sandbox` (a `Sandbox`): every program runs with its working directory, HOME and
  TMPDIR inside one root, its data directories three levels below it (so `../` escapes from
  staging land inside the root too) and `sandbox.bait`, an absolute path for attacks to aim
  at. `hostile.assert_confined()` fails if anything was written under the root outside the
  data directories; the fixture checks it again after every test. A test that gives a program
  another data directory (say `archive_dir=`) declares it with `sandbox.allow(path)`.

Bounds: `SCAN_TIMEOUT` for the well-behaved scan (a liveness bound, not a speed target:
speed lives in benchmarks/). What the teardown does: stops the programs (SIGTERM, then
SIGKILL), closes the clients, stops the broker, checks confinement.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from devtools.broker import Mosquitto
from devtools.stack import Program, Watcher, wait_ingest_online
from server_ingest.identities import write_secret
from tests.security.conftest import Probe, Tls
from tilebridge_protocol.topics import (
    DEVICE_STATUS_FILTER,
    IMAGE_STATUS_FILTER,
    INGEST_STATUS_FILTER,
    ingest_status_topic,
)

MiB = 1024 * 1024
GOOD, EVIL = "scope-good", "scope-evil"
HARNESS_MONITOR = "monitor-harness"
IDENTITIES = ("ingest", "monitor", HARNESS_MONITOR, GOOD, EVIL)
INSTANCE = "ingest-1"
SCAN_TIMEOUT = 60.0
# The ingest's peak RSS over a whole 2x2 scan is about 60 MiB on the development machine
# (measured with RssSampler); an attack that grows it past this has found a leak or a bomb.
INGEST_RSS_BOUND = 256 * MiB
FAST_RESEND = {"commit_timeout_s": 2.0, "max_commit_timeout_s": 4.0}


@dataclass
class Sandbox:
    """One root for everything the programs may touch; see `allowed` and `outside()`."""

    root: Path
    extra: list[Path] = field(default_factory=list)

    def allow(self, path: Path) -> Path:
        """One more data directory (e.g. an `archive_dir` a test gives the ingest)."""
        self.extra.append(path)
        return path

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def run(self) -> Path:
        """Configs, logs and password files the harness writes for the programs."""
        return self.root / "run"

    @property
    def data(self) -> Path:
        return self.root / "var" / "lib" / "data"

    @property
    def ingest_data(self) -> Path:
        return self.data / "ingest"

    def device_data(self, device: str) -> Path:
        return self.data / device

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def bait(self) -> Path:
        """Never written by anyone: aim absolute paths here."""
        return self.root / "bait"

    @property
    def allowed(self) -> tuple[Path, ...]:
        devices = (self.device_data(GOOD), self.device_data(EVIL))
        return (self.broker, self.run, self.ingest_data, *devices, *self.extra)

    def skeleton(self) -> set[Path]:
        data = [self.data, self.data.parent, self.data.parent.parent]
        return {self.cwd, self.bait, self.root / "home", self.root / "tmp", *data}

    def make(self) -> Sandbox:
        for path in (*self.skeleton(), self.run):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def environment(self) -> dict[str, str]:
        return {"HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp")}

    def outside(self) -> list[Path]:
        """Everything under the root that is neither in a data directory nor the skeleton."""
        found = []
        for top, dirs, files in os.walk(self.root):
            for name in [*dirs, *files]:
                path = Path(top) / name
                if path in self.skeleton() or any(path.is_relative_to(a) for a in self.allowed):
                    continue
                found.append(path)
        return sorted(found)


class RssSampler:
    """The resident set size of a running program, sampled on a thread while in `with`."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self.exited = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                self.exited = True
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class ScanResult:
    returncode: int
    seconds: float
    summary: dict[str, Any]
    """`edge-agent simulate --summary`: image_id, frames, state, locations."""
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.summary.get("state") == "complete"


@dataclass
class RunningScan:
    program: Program
    summary_path: Path
    timeout: float
    started: float = field(default_factory=time.monotonic)

    def result(self) -> ScanResult:
        code = self.program.wait(self.timeout + 30)
        seconds = time.monotonic() - self.started
        summary = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        return ScanResult(code, seconds, summary, self.program.log_tail(200))


class Hostile:
    def __init__(self, root: Path, certs: Path) -> None:
        self.sandbox = Sandbox(root).make()
        self.passwords = {name: secrets.token_urlsafe(24) for name in IDENTITIES}
        self.broker = Mosquitto.secured(
            self.sandbox.broker, self.passwords, tls=True, tls_clients=(GOOD, EVIL),
            certs_dir=certs,
        ).start()  # fmt: skip
        self.status = Watcher(
            self.broker, DEVICE_STATUS_FILTER, INGEST_STATUS_FILTER, IMAGE_STATUS_FILTER,
            username=HARNESS_MONITOR, password=self.passwords[HARNESS_MONITOR],
        )  # fmt: skip
        self.ingest: Program | None = None
        self._programs: list[Program] = []
        self._probes: list[Probe] = []
        self._scans = 0

    # -- identities ---------------------------------------------------------------------------

    def password_file(self, name: str) -> Path:
        path = self.sandbox.run / f"{name}.password"
        if not path.exists():
            write_secret(path, self.passwords[name])
        return path

    def tls(self, name: str | None) -> Tls:
        """The lab CA, and `name`'s client certificate unless None."""
        if name is None:
            return Tls(self.broker.ca_file)
        cert, key = self.broker.client_cert(name)
        return Tls(self.broker.ca_file, cert, key)

    def client(self, user: str | None, password: str | None = None, **kw: Any) -> Probe:
        """A raw client for `user` (its own password unless given); closed after the test."""
        if user is not None and password is None:
            password = self.passwords.get(user)
        port: int | None = kw.pop("port", None)
        port = port or (self.broker.tls_port if kw.get("tls") else self.broker.port)
        assert port is not None
        probe = Probe(port, user, password, **kw)
        self._probes.append(probe)
        return probe

    # -- the programs ---------------------------------------------------------------------------

    def program(self, module: str, config: dict[str, Any], name: str) -> Program:
        program = Program(module, config, self.sandbox.run, name, cwd=self.sandbox.cwd,
                          env=self.sandbox.environment())  # fmt: skip
        self._programs.append(program)
        return program

    def start_ingest(self, timeout: float = 30, **settings: Any) -> Program:
        """The real ingest, started (again, if it was) and online."""
        if self.ingest is None:
            broker = {
                "host": self.broker.host,
                "port": self.broker.port,
                "username": "ingest",
                "password_file": str(self.password_file("ingest")),
            }
            config: dict[str, Any] = {
                "instance": INSTANCE,
                "broker": broker,
                "data_dir": str(self.sandbox.ingest_data),
                "status_interval_s": 1.0,
            }
            self.ingest = self.program("server_ingest", {**config, **settings}, "ingest")
        self.ingest.start("run")
        wait_ingest_online(self.status, INSTANCE, timeout)
        return self.ingest

    def ingest_status(self) -> dict[str, Any] | None:
        return self.status.latest(ingest_status_topic(INSTANCE))

    def agent_config(self, device: str = GOOD, **settings: Any) -> dict[str, Any]:
        """AgentSettings for `device` over TLS (certificate and password), its data in
        `sandbox.device_data(device)`; `settings` override, e.g. `http_port=`."""
        data = self.sandbox.device_data(device)
        assert self.broker.tls_port is not None
        cert, key = self.broker.client_cert(device)
        return {
            "device_id": device,
            "broker": {
                "host": self.broker.host, "port": self.broker.tls_port, "username": device,
                "password_file": str(self.password_file(device)), "tls": True,
                "ca_file": str(self.broker.ca_file), "cert_file": str(cert), "key_file": str(key),
            },
            "spool_dir": str(data / "spool"),
            "local_output_root": str(data / "local"),
            "status_interval_s": 1.0,
            "min_free_bytes": 0,
            **FAST_RESEND,
            **settings,
        }  # fmt: skip

    def start_scan(
        self, columns: int = 2, rows: int = 2, tile_size: int = 256, channels: int = 1,
        timeout: float = SCAN_TIMEOUT, **agent: Any,
    ) -> RunningScan:  # fmt: skip
        """GOOD's `edge-agent simulate` in the background; `agent` are AgentSettings."""
        self._scans += 1
        summary = self.sandbox.run / f"scan-{self._scans}.json"
        program = self.program(
            "edge_agent", self.agent_config(GOOD, **agent), f"scan-{self._scans}"
        )
        program.start(
            "simulate", "--columns", str(columns), "--rows", str(rows), "--tile-size",
            str(tile_size), "--channels", str(channels), "--seed", str(self._scans),
            "--timeout", str(timeout), "--summary", str(summary),
        )  # fmt: skip
        return RunningScan(program, summary, timeout)

    def scan(self, **options: Any) -> ScanResult:
        """A whole scan by the well-behaved device; see `start_scan`."""
        return self.start_scan(**options).result()

    def rss(self, program: Program) -> RssSampler:
        assert program.proc is not None, f"{program.name} is not running"
        return RssSampler(program.proc.pid)

    # -- checks and clean-up --------------------------------------------------------------------

    def assert_confined(self) -> None:
        outside = self.sandbox.outside()
        assert not outside, f"written outside the data directories: {outside}"

    def close(self) -> None:
        for program in self._programs:
            program.stop()
        for probe in self._probes:
            probe.close()
        self.status.close()
        self.broker.stop()


@pytest.fixture(scope="session")
def hostile_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lab CA and client certificates for the whole session (make_certs.sh keeps them)."""
    return tmp_path_factory.mktemp("hostile-certs")


@pytest.fixture
def hostile(tmp_path: Path, hostile_certs: Path) -> Iterator[Hostile]:
    world = Hostile(tmp_path / "sandbox", hostile_certs)
    try:
        yield world
    finally:
        world.close()
    world.assert_confined()

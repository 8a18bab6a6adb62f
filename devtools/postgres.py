"""Start a real, throw-away PostgreSQL server on a free loopback port.

For the tests and benchmarks of the PostgreSQL ledger (several ingest instances share it).
Debian's `postgresql` package provides the binaries (`make test` installs it); the cluster
lives in a temporary directory, listens on 127.0.0.1 only (no Unix socket outside it) and
trusts local connections, so no password is involved. PostgreSQL refuses to run as root:
when the tests run as root, the cluster belongs to the unprivileged `postgres` user (made by
the Debian package) and is run through `runuser`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from devtools.broker import free_port

SUPERUSER = "tilebridge"
DATABASE = "tilebridge"


def binaries() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<v>/bin,
    whose tools are not all on PATH), else wherever `pg_ctl` on PATH really lives."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL is not installed (make test installs Debian's postgresql)")


class Postgres:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.run_as: str | None = "postgres" if os.geteuid() == 0 else None
        # As root, the cluster's user could not reach a root-only test directory (pytest's
        # are 0700): the cluster then gets its own directory under /tmp, removed by `stop`.
        self.owned_dir = (
            Path(tempfile.mkdtemp(prefix="tilebridge-pg-")) if self.run_as is not None else None
        )
        self.workdir = self.owned_dir or Path(workdir)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.bin = binaries()
        self.data = self.workdir / "pgdata"
        self.socket_dir = self.workdir / "pgsocket"
        self.log_path = self.workdir / "postgres.log"

    @property
    def dsn(self) -> str:
        """A libpq connection string for psycopg (`psycopg.connect(dsn)`)."""
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={DATABASE}"

    def _command(self, *args: str) -> list[str]:
        if self.run_as is None:
            return list(args)
        return ["runuser", "-u", self.run_as, "--", *args]

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._command(*args), check=True, capture_output=True, text=True)

    def _own(self, *paths: Path) -> None:
        if self.run_as is None:
            return
        user = pwd.getpwnam(self.run_as)
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)

    def initdb(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self.log_path.touch()
        self._own(self.workdir, self.socket_dir, self.log_path)
        self._run(
            str(self.bin / "initdb"),
            "-D", str(self.data),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        )  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# devtools/postgres.py: loopback only, small and quick\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 100\n"
                "shared_buffers = 64MB\n"
            )

    def start(self) -> Postgres:
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            self.initdb()
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                  "-w", "-t", "60", "start")  # fmt: skip
        if fresh:
            try:
                self._run(
                    str(self.bin / "createdb"), "-h", self.host, "-p", str(self.port),
                    "-U", SUPERUSER, DATABASE,
                )  # fmt: skip
            except subprocess.CalledProcessError:
                self.remove()  # a server that cannot be used must not outlive the test
                raise
        return self

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown; `immediate`: like a crash (recovery at the next start)."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._command(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode,
                              "-w", "-t", "60", "stop"),
                capture_output=True, text=True, check=False,
            )  # fmt: skip

    def kill(self) -> None:
        """kill -9 of the postmaster: the server dies without any shutdown."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().splitlines()[0])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def remove(self) -> None:
        """Stop (as a crash: nothing to keep) and delete the cluster's own directory."""
        self.stop("immediate")
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.remove()

"""A throw-away Prometheus server (Debian's `prometheus`) on a free loopback port, scraping
given targets every second with given alerting rules, for the alert tests.

The rules are the shipped ones with every `for:` set to 0s, so a test sees an alert as soon
as its expression holds instead of waiting minutes; the expressions are unchanged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from devtools.broker import free_port

BINARY = "/usr/bin/prometheus"


def immediate(rules_file: Path, out: Path) -> Path:
    """A copy of `rules_file` whose alerts fire without waiting (`for: 0s`)."""
    rules = yaml.safe_load(rules_file.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    out.write_text(yaml.safe_dump(rules))
    return out


class Prometheus:
    def __init__(self, workdir: Path, rules_file: Path, targets: dict[str, list[str]]) -> None:
        """`targets`: job name -> ["127.0.0.1:port", ...]."""
        if shutil.which(BINARY) is None:
            raise RuntimeError("apt-get install prometheus (its server runs the alert tests)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        rules = immediate(rules_file, workdir / "rules.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": hosts}]}
                for job, hosts in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with (self.workdir / "prometheus.log").open("wb") as log_file:
            self._process = self._start(log_file)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._get("/-/ready")
                return self
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "prometheus.log").read_text()[-2000:]
                    self.__exit__()
                    raise RuntimeError(f"prometheus did not start: {log}") from None
                time.sleep(0.2)

    def _start(self, log_file: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                BINARY,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            body = r.read()
        return json.loads(body) if body.startswith(b"{") else body

    def firing(self) -> dict[str, list[dict[str, str]]]:
        """Alert name -> the label sets of its firing alerts."""
        alerts = self._get("/api/v1/alerts")["data"]["alerts"]
        out: dict[str, list[dict[str, str]]] = {}
        for alert in alerts:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def wait_firing(self, name: str, timeout: float = 30, **labels: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for found in self.firing().get(name, []):
                if all(found.get(k) == v for k, v in labels.items()):
                    return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"alert {name} {labels} never fired: {self.firing()}")
            time.sleep(0.5)

    def wait_resolved(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while name in self.firing():
            if time.monotonic() > deadline:
                raise TimeoutError(f"alert {name} still firing")
            time.sleep(0.5)

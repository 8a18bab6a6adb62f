"""Run the real programs (`server-ingest`, `edge-agent`) as processes against a broker.

Shared by the demo, the end-to-end tests and the benchmarks, so all three exercise exactly
what an admin installs: the console commands, configured by JSON files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from devtools.broker import Mosquitto
from tilebridge_protocol.topics import ingest_status_topic


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Program:
    """One console command of tilebridge, run as `python -m <module>` with a config file."""

    def __init__(
        self,
        module: str,
        config: dict[str, Any],
        workdir: Path,
        name: str,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`cwd` and `env` (added to this process's environment): where the program runs."""
        self.module = module
        self.config = config
        self.workdir = workdir
        self.name = name
        self.cwd = cwd
        self.env = dict(env or {})
        self.config_path = workdir / f"{name}.json"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str, stderr_to_log: bool = True) -> Program:
        self.config_path.write_text(json.dumps(self.config, indent=2, default=str))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config_path), *args],
                stdout=log if stderr_to_log else None,
                stderr=log if stderr_to_log else None,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"{self.name} still running after {timeout:.0f} s:\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 15) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """`kill -9`: no clean-up, no last words (the broker publishes the last will)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def broker_config(broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    return {"host": broker.host, "port": broker.port, **extra}


def ingest_program(broker: Mosquitto, workdir: Path, **settings: Any) -> Program:
    config: dict[str, Any] = {
        "instance": "ingest-1",
        "broker": broker_config(broker),
        "data_dir": str(workdir / "ingest"),
        "status_interval_s": 1.0,
    }
    config.update(settings)
    return Program("server_ingest", config, workdir, "ingest")


def agent_program(
    broker: Mosquitto, workdir: Path, name: str = "agent", **settings: Any
) -> Program:
    config: dict[str, Any] = {
        "device_id": "scope-1",
        "broker": broker_config(broker),
        "spool_dir": str(workdir / "spool"),
        "status_interval_s": 1.0,
        "min_free_bytes": 0,
    }
    config.update(settings)
    return Program("edge_agent", config, workdir, name)


class Watcher:
    """A plain paho subscriber that records everything on the given topic filters."""

    def __init__(self, broker: Mosquitto, *filters: str, **credentials: str) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if credentials:
            self.client.username_pw_set(credentials["username"], credentials.get("password"))

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe([(f, 1) for f in filters])

        def on_subscribe(*_: Any) -> None:
            self._subscribed.set()

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            payload = bytes(msg.payload)
            with self._lock:
                self.messages.append((msg.topic, payload, bool(msg.retain)))
                if payload:
                    self.retained[msg.topic] = payload
                else:
                    self.retained.pop(msg.topic, None)

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("watcher could not subscribe")

    def latest(self, topic: str) -> dict[str, Any] | None:
        """The last JSON message seen on `topic`."""
        with self._lock:
            for seen, payload, _ in reversed(self.messages):
                if seen == topic and payload:
                    return dict(json.loads(payload))
        return None

    def latest_raw(self, topic: str) -> bytes | None:
        with self._lock:
            for seen, payload, _ in reversed(self.messages):
                if seen == topic:
                    return payload
        return None

    def all(self, topic_part: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if topic_part in t and p]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_ingest_online(watcher: Watcher, instance: str = "ingest-1", timeout: float = 30) -> None:
    topic = ingest_status_topic(instance)
    wait_for(
        lambda: (
            (watcher.latest(topic) or {}).get("state") == "online"
            and (watcher.latest(topic) or {}).get("broker_connected")
        ),
        timeout,
        f"{instance} online",
    )

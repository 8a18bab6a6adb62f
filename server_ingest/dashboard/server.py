"""Runs the dashboard: the broker monitor plus the web app under uvicorn."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from server_ingest.dashboard.app import create_app
from server_ingest.dashboard.board import StatusBoard
from server_ingest.dashboard.monitor import StatusMonitor
from server_ingest.dashboard.settings import DashboardSettings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would re-raise SIGTERM after shutting down, so the process would end "killed
        # by SIGTERM"; `DashboardServer.run` handles the signals and the exit is a clean 0.
        yield


class DashboardServer:
    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self.board = StatusBoard(
            settings.omero_web_url,
            stale_s=settings.device_stale_s,
            omero_web_urls=settings.omero_web_urls,
        )
        self.monitor = StatusMonitor(settings, self.board)
        self.app = create_app(self.board, tick=self._tick, stopping=lambda: self.server.should_exit)
        config = uvicorn.Config(
            self.app,
            host=settings.listen_host,
            port=settings.listen_port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            # Open event streams end within a second of shutdown; this only bounds stragglers.
            timeout_graceful_shutdown=5,
        )
        self.server = _Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.listen_host}:{self.settings.listen_port}"

    def run(self) -> None:
        """In the foreground until SIGTERM or SIGINT."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: setattr(self.server, "should_exit", True))
        self.monitor.start()
        try:
            self.server.run()
        finally:
            self.board.close()
            self.monitor.stop()

    def start(self, timeout: float = 10.0) -> DashboardServer:
        """In a background thread (tests, embedding); returns once it accepts connections."""
        self.monitor.start()
        self._thread = threading.Thread(target=self.server.run, name="dashboard-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dashboard did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.board.close()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.monitor.stop()

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _tick(self) -> None:
        self.board.expire()
        self.monitor.poll()


def main(config_file: Path | None) -> int:
    """`server-ingest --config dashboard.json dashboard`."""
    try:
        settings = DashboardSettings.load(config_file)
    except (ValueError, OSError) as exc:
        log.error("invalid dashboard configuration: %s", exc)
        return 2
    server = DashboardServer(settings)
    log.info("dashboard on %s", server.url)
    server.run()
    return 0

"""The device status: built from the parts' own records, published retained on
`dev/<device>/status` by the reporter thread, which also does the agent's housekeeping
(the abandoned-experiment policy, forgetting experiments past their retention)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from edge_agent.acquisition import Acquisition
from edge_agent.progress import summary_of
from edge_agent.publisher import Publisher
from edge_agent.settings import AgentSettings
from edge_agent.spool import Spool
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import DeviceStatus, Liveness
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_runtime.mqtt import MqttConnection

log = logging.getLogger(__name__)

MAX_SUMMARIES = 20


class Reporter:
    def __init__(
        self,
        settings: AgentSettings,
        spool: Spool,
        publisher: Publisher,
        connection: MqttConnection,
        acquisition: Acquisition,
        instance: str,
        started_at: datetime,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.publisher = publisher
        self.connection = connection
        self.acquisition = acquisition
        self.instance = instance
        self.started_at = started_at
        self.topic = device_topic(settings.device_id, DeviceTopic.STATUS)
        self._throughput = 0.0
        self._last = (time.monotonic(), 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def status(self, state: Liveness = Liveness.ONLINE) -> DeviceStatus:
        """A snapshot; reading it changes nothing (throughput is measured by the thread)."""
        stats = self.spool.stats()
        c = self.publisher.counters
        experiments = self.acquisition.experiments()
        current = next(iter(experiments), None)
        now = time.time()
        open_ones = [e for e in experiments if _open(e.state, e.server)]
        last_error = (
            self.acquisition.problems.latest()
            or self.publisher.last_error
            or self.connection.last_error
        )
        return DeviceStatus(
            at=utcnow(), device=self.settings.device_id, state=state,
            buffered_tiles=stats.tiles, buffered_bytes=stats.bytes,
            oldest_pending_age_s=stats.oldest_pending_age_s, inflight_tiles=c.inflight_tiles,
            images_pending=stats.images, committed_tiles=c.committed_tiles,
            retransmits=c.retransmits, rejected_tiles=c.rejected_tiles,
            throughput_bytes_per_s=self._throughput, disk_free_bytes=stats.disk_free_bytes,
            current_experiment=current.experiment if current else None,
            broker_connected=self.connection.connected.is_set(), last_error=last_error,
            backends=dict(current.backends) if current else {},
            agent_instance=self.instance, agent_started_at=self.started_at,
            experiments=[summary_of(e, now) for e in open_ones[:MAX_SUMMARIES]],
        )  # fmt: skip

    def publish(self) -> None:
        if self.connection.connected.is_set():
            self.connection.publish(self.topic, self.status().to_bytes(), retain=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.status_interval_s):
            try:
                self._measure_throughput()
                self.acquisition.end_abandoned()
                self.spool.purge(self.settings.experiment_retention_s)
                self.publish()
            except Exception:  # status must never take the agent down
                log.exception("status report")

    def _measure_throughput(self) -> None:
        now = time.monotonic()
        committed = self.publisher.counters.committed_bytes
        then, before = self._last
        self._throughput = (committed - before) / (now - then) if now > then else 0.0
        self._last = (now, committed)


def _open(state: str, server: str) -> bool:
    return state in ("acquiring", "finalizing") or server == "sending"

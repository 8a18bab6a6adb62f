"""The composition root of the edge agent: builds every part from the settings and wires
them; no part wires itself.

    settings ─▶ ConfigStore (acquisition defaults, transport)
             ─▶ Spool (durable state) ◀── Acquisition (the front door) ◀── HTTP API, fast path
                  │ on_queued                                   ▲
                  ▼                                             │ server_answered
             Mailbox ─▶ Publisher (owner of flights) ───────────┘
                  ▲  PUBACKs, acks
             MqttConnection (network thread)
             Reporter (status, housekeeping)      metrics (observe only)

Threads: `edge-mqtt` (network: posts events), `edge-publisher` (owns flights), `edge-status`
(status and housekeeping), one per local target (`local-<name>`), the HTTP server's and the
fast path's (they call the front door). The HTTP API is served by `edge_agent.http.serve(app)`
(`edge-agent run` does it): kept out of here so that an in-process agent (the ImSwitch
adapter's) imports no web server. Who owns which state: docs/architecture.md.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from uuid import uuid4

from edge_agent.acquisition import Acquisition
from edge_agent.config import ConfigStore, OMEWriterConfig
from edge_agent.fastpath import FastPath
from edge_agent.flights import Mailbox
from edge_agent.live import MakeBackend, registry_backend
from edge_agent.localtargets import Budget
from edge_agent.metrics import serve_metrics
from edge_agent.publisher import Publisher
from edge_agent.settings import AgentSettings
from edge_agent.spool import Spool
from edge_agent.status import Reporter
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import DeviceStatus, Liveness
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_runtime.mqtt import MqttConnection

log = logging.getLogger(__name__)


class EdgeApp:
    def __init__(self, settings: AgentSettings, make_backend: MakeBackend = registry_backend):
        self.settings = settings
        self.instance = uuid4().hex
        self.started_at = utcnow()
        initial = OMEWriterConfig.for_transport(
            settings.codec, settings.bandwidth_limit_bytes_per_s
        )
        self.config = ConfigStore(
            settings.spool_dir / "omewriter.json", settings.local_output_root, initial,
            on_change=self._transport,
        )  # fmt: skip
        self.mailbox = Mailbox()
        self.spool = Spool(settings.spool_dir, settings.min_free_bytes, self.mailbox.ring)
        status_topic = device_topic(settings.device_id, DeviceTopic.STATUS)
        offline = DeviceStatus(at=utcnow(), device=settings.device_id, state=Liveness.OFFLINE)
        self.connection = MqttConnection(
            settings.broker,
            client_id=f"tb-edge-{settings.device_id}",
            name="edge-mqtt",
            on_connected=self._connected,
            # late-bound: the publisher needs the connection, so it is made after it
            on_message=lambda msg: self.publisher.on_message(msg),  # noqa: PLW0108
            on_published=lambda mid: self.publisher.on_published(mid),  # noqa: PLW0108
            will=(status_topic, offline.to_bytes()),
        )
        self.acquisition = Acquisition(self.spool, settings, self.config.current, make_backend)
        self.publisher = Publisher(
            self._transport_settings(self.config.current()), self.spool, self.connection,
            self.mailbox, on_image_done=self._image_done,
        )  # fmt: skip
        self.reporter = Reporter(
            settings, self.spool, self.publisher, self.connection, self.acquisition,
            self.instance, self.started_at,
        )  # fmt: skip
        self.receiving = Budget(settings.acquisition_memory_bytes // 2)
        self.fast_path = FastPath(self.acquisition, self.reporter, self.receiving)
        self._stop = threading.Event()

    @property
    def device(self) -> str:
        return self.settings.device_id

    def start(self) -> EdgeApp:
        self.spool.recover()
        self.acquisition.recover()
        serve_metrics(self, self._stop)
        self.publisher.start()
        self.connection.start()
        self.reporter.start()
        if self.settings.fast_path:
            self.fast_path.serve(self.settings.socket_path)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.fast_path.stop()
        self.reporter.stop()
        self.publisher.stop()
        offline = self.reporter.status(Liveness.OFFLINE)
        self.connection.stop(final=(self.reporter.topic, offline.to_bytes()))
        self.spool.close()

    def __enter__(self) -> EdgeApp:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def status(self, state: Liveness = Liveness.ONLINE) -> DeviceStatus:
        return self.reporter.status(state)

    # -- wiring -----------------------------------------------------------------------------

    def _connected(self, client: Any) -> None:
        self.publisher.subscribe(client)
        self.reporter.publish()

    def _image_done(self, image_id: Any) -> None:
        self.acquisition.server_answered(image_id)
        self.reporter.publish()

    def _transport_settings(self, config: OMEWriterConfig) -> AgentSettings:
        return self.settings.model_copy(
            update={"codec": config.codec,
                    "bandwidth_limit_bytes_per_s": config.bandwidth_limit_bytes_per_s}
        )  # fmt: skip

    def _transport(self, config: OMEWriterConfig) -> None:
        """Compression and the cap apply to everything the agent sends, from the next chunk."""
        self.publisher.use_settings(self._transport_settings(config))

"""The ingest's composition root: builds every part from the settings and wires them.

No part wires itself or knows who calls it: each gets what it talks to in its constructor.

    network thread ──Inbound──▶ Inbox ──▶ Core (ingest-core) ──▶ Outbox (acks, image status)
                                  ▲            │ jobs, records, commands
        events (results) ─────────┴── Stager (ingest-stage-n), LedgerWriter (ingest-ledger),
                                      Storer (ingest-storer-n)

`Engine` is everything but the broker (the tests drive it directly); `IngestService` adds the
broker connection, the status reporter and the metrics endpoint.
"""

from __future__ import annotations

import itertools
import logging
import resource
import threading
import time
from collections.abc import Callable, Sequence

from server_ingest.backends import build_backends, build_destinations
from server_ingest.broker import MqttOutbox, StatusReporter, inbound, subscribe, subscriptions
from server_ingest.claimer import Claimer
from server_ingest.claims import LocalClaims
from server_ingest.control import ControlServer
from server_ingest.core import Core
from server_ingest.events import Barrier, Inbound
from server_ingest.flow import Windows
from server_ingest.inbox import Inbox
from server_ingest.ledger.base import Ledger
from server_ingest.ledger.choice import Chosen, open_ledger
from server_ingest.ledger.writer import LedgerWriter
from server_ingest.lifecycle import Policy
from server_ingest.metrics import IngestCollector, MetricsServer
from server_ingest.ports import Outbox, Relay
from server_ingest.preview import Previewer, Publish
from server_ingest.retention import DiskWatch
from server_ingest.routing import Router
from server_ingest.settings import IngestSettings
from server_ingest.stager import Stager
from server_ingest.staging import Staging
from server_ingest.state import Snapshot
from server_ingest.storer import Storer
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import IngestStatus, Liveness
from tilebridge_protocol.topics import DeviceTopic, device_topic, ingest_status_topic
from tilebridge_runtime.durable import HeldLock
from tilebridge_runtime.mqtt import SESSION_EXPIRY_S, MqttConnection
from tilebridge_storage.base import StorageBackend

log = logging.getLogger(__name__)


def raise_open_file_limit() -> None:
    """Backends may hold a memory map (one file descriptor) per staged tile of an image that
    is still being written; the usual soft limit of 1024 is far too low for big mosaics."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Engine:
    """Staging, ledger, storer and the core, wired; device messages go in with `handle`."""

    def __init__(
        self,
        settings: IngestSettings,
        outbox: Outbox,
        backends: Sequence[StorageBackend] | None = None,
        ledger: Ledger | None = None,
        relay: Relay | None = None,
        clock: Callable[[], float] = time.time,
        preview: Publish | None = None,
    ) -> None:
        """`clock`: the wall clock events are stamped with (tests move it ahead); `preview`:
        where live previews go (none without it)."""
        # One process per data directory: never a second writer of its ledger and staging.
        self._lock = HeldLock(settings.lock_path)
        try:
            self._wire(settings, outbox, backends, ledger, relay, clock, preview)
        except BaseException:
            self._lock.release()
            raise
        self._started = False

    def _wire(
        self,
        settings: IngestSettings,
        outbox: Outbox,
        backends: Sequence[StorageBackend] | None,
        ledger: Ledger | None,
        relay: Relay | None,
        clock: Callable[[], float],
        preview: Publish | None,
    ) -> None:
        self.settings = settings
        limits = settings.limits
        self.inbox = Inbox(settings.inbox_messages)
        self.chosen = (
            open_ledger(settings)
            if ledger is None
            else Chosen(ledger, LocalClaims(settings.instance))
        )
        self.ledger, self.claims = self.chosen.ledger, self.chosen.claims
        self.staging = Staging(settings.staging_dir)
        self.ledger_writer = LedgerWriter(self.ledger, self.inbox.post)
        self.stager = Stager(self.staging, self.inbox.post, settings.staging_workers)
        targets = build_backends(settings) if backends is None else list(backends)
        self.storer = Storer(
            targets,
            self.staging,
            self.inbox.post,
            settings.store_retry_s,
            settings.store_retry_max_s,
            settings.storer_workers,
            settings.verify_attempts,
            build_destinations(settings, targets),
            self.claims,
        )
        p = settings.preview
        self.previewer = (
            Previewer(self.staging, preview, p.max_px, p.images, p.interval_s)
            if preview is not None and p.enabled
            else None
        )
        # Several instances: devices are claimed, their messages routed (docs/scale.md).
        self.claimer: Claimer | None = None
        router = None
        if self.claims.shared:
            if relay is None:
                raise ValueError("a shared ledger needs a relay to the other instances")
            claimer = self.claimer = Claimer(
                self.claims, self.ledger, self.staging, self.inbox.post
            )
            router = Router(
                settings.instance,
                claimer.ask,
                relay.relay,
                lambda: claimer.valid_until,
                limits.max_parked_bytes_per_device,
            )
        windows = Windows(settings.flow) if settings.flow.enabled else None
        policy = Policy(limits.image_ttl_s, settings.keep_staged)
        self._barriers: dict[int, threading.Event] = {}
        self._barrier_tokens = itertools.count(1)
        self.core = Core(
            self.inbox,
            limits,
            policy,
            self.ledger_writer,
            self.stager,
            self.storer,
            outbox,
            settings.dead_letter_payload_bytes,
            tuple(b.name for b in self.storer.backends),
            on_idle=self._idle,
            router=router,
            windows=windows,
            clock=clock,
            retention=settings.retention,
            # Kept copies are swept only where this instance alone stages (docs/operations.md).
            keep_staged=settings.keep_staged and not self.claims.shared,
            preview=self.previewer,
        )
        self.disk = DiskWatch(
            settings.staging_dir, self.inbox.post, settings.retention.check_interval_s
        )

    def start(self) -> Engine:
        recovered = []
        if self.claimer is None:  # alone: everything staged and recorded is ours
            dropped = self.staging.drop_partials()
            if dropped:
                log.info(
                    "dropped %d partial tiles from before the restart; devices resend them",
                    dropped,
                )
            recovered = self.ledger.recover()
        self.ledger_writer.start()
        self.stager.start()
        self.storer.start()
        self.core.recover(recovered)
        self.core.start()
        self.disk.start()
        if self.previewer is not None:
            self.previewer.start()
        if self.claimer is not None:  # shared: a device's images are taken up with its claim
            self.claimer.start()
        self._started = True
        if recovered:
            log.info("holding %d images from before the restart", len(recovered))
        return self

    def stop(self) -> None:
        if self._started:
            self.disk.stop()
            self.core.stop()
            if self.previewer is not None:
                self.previewer.stop()
            self.stager.stop()
            self.storer.stop()
            self.ledger_writer.stop()
            if self.claimer is not None:
                self.claimer.stop()
        self.chosen.close()
        self._lock.release()

    def handle(self, message: Inbound) -> None:
        """Put a device message into the core's inbox (blocks while the inbox is full)."""
        self.inbox.from_network(message)

    def snapshot(self) -> Snapshot:
        return self.core.snapshot

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until nothing the core handed out is in flight (tests, benchmarks)."""
        token = next(self._barrier_tokens)
        done = self._barriers[token] = threading.Event()
        self.inbox.post(Barrier(token))
        if not done.wait(timeout):
            raise TimeoutError("the ingest did not become idle")
        del self._barriers[token]

    def _idle(self, token: int) -> None:
        event = self._barriers.get(token)
        if event is not None:
            event.set()


class IngestService:
    """The running ingest: the engine behind a broker connection, status and metrics."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.status_topic = ingest_status_topic(settings.instance)
        offline = IngestStatus(at=utcnow(), instance=settings.instance, state=Liveness.OFFLINE)
        self.connection = MqttConnection(
            settings.broker,
            client_id=f"tb-ingest-{settings.instance}",
            name="ingest-mqtt",
            on_connected=self._connected,
            on_message=lambda message: self.engine.handle(inbound(message)),
            will=(self.status_topic, offline.to_bytes()),
            # A member of a shared subscription must not keep a session once gone: the broker
            # would go on handing it its share of every device's messages (docs/scale.md).
            session_expiry_s=0 if settings.cluster.subscription == "shared" else SESSION_EXPIRY_S,
        )
        outbox = MqttOutbox(
            self.connection, settings.image_status_ttl_s, settings.cluster.relay_ttl_s
        )
        self.engine = Engine(settings, outbox, relay=outbox, preview=outbox.image_preview)
        self._filters = subscriptions(
            settings.instance, settings.cluster, routed=self.engine.claims.shared
        )
        self.storer = self.engine.storer
        self.control = ControlServer(
            settings.control_path, self.engine.inbox.post, self._clear_device_status
        )
        self.reporter = StatusReporter(
            self.connection,
            self.status_topic,
            settings.instance,
            self.engine.snapshot,
            settings.status_interval_s,
        )
        self.metrics = None
        if settings.metrics_port is not None:
            collector = IngestCollector(
                settings.instance, self.engine.snapshot, self.connection.connected.is_set
            )
            self.metrics = MetricsServer(settings.metrics_host, settings.metrics_port, collector)

    def start(self) -> IngestService:
        raise_open_file_limit()
        if self.metrics is not None:
            self.metrics.start()
        self.engine.start()
        self.connection.start()
        self.reporter.start()
        self.control.start()
        return self

    def stop(self) -> None:
        self.control.stop()
        self.reporter.stop()
        offline = self.status(Liveness.OFFLINE)
        self.connection.stop(final=(self.status_topic, offline.to_bytes()))
        self.engine.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def status(self, state: Liveness = Liveness.ONLINE) -> IngestStatus:
        return self.reporter.status(state)

    def __enter__(self) -> IngestService:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _clear_device_status(self, device: str) -> None:
        """A removed device's retained status would say `online` forever (the broker drops
        its connection without publishing its will): an empty retained message clears it."""
        self.connection.publish(device_topic(device, DeviceTopic.STATUS), b"", retain=True)

    def _connected(self, client: object) -> None:
        subscribe(client, self._filters)  # type: ignore[arg-type]
        self.reporter.publish()

"""Drains the spool to the broker and forgets data only on the server's acks.

One thread ("edge-publisher") owns every flight (an item taken from the spool, published,
not yet acknowledged), the message-id map and the in-flight byte budget. Nothing else
touches them: the broker's network thread only posts events (a PUBACK's message id, an
ack, an ingest's liveness) to the owner's mailbox, and the owner applies them in order.
So a flight is registered before its first publish, and a PUBACK that the network thread
sees before `publish()` has even returned waits in the mailbox until the owner has recorded
that message id: it can never be lost or applied to nothing.

Tile bytes in flight are bounded by `inflight_bytes` (the budget), or by the smaller window
the server granted this device (a `credit` ack: fleet-level flow control), which bounds
memory here and the broker's queue for the ingest, however large the backlog and the fleet.
A tile whose `committed` ack does not come is published again after `commit_timeout_s`,
doubling up to `max_commit_timeout_s`, but only while the ingest reports itself online.
The loop never blocks on anything but its mailbox (and the bandwidth cap, when one is set).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import paho.mqtt.client as mqtt

from edge_agent.errors import UnknownExperimentError
from edge_agent.flights import Budget, Counters, Flight, FlightKey, Mailbox
from edge_agent.problems import Problems
from edge_agent.ratelimit import throttle
from edge_agent.settings import AgentSettings
from edge_agent.spool import Item, Spool
from tilebridge_protocol.errors import ProtocolError, TransientError
from tilebridge_protocol.framing import encode_tile
from tilebridge_protocol.messages import (
    AnyAck,
    CreditAck,
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    TileAck,
    TileState,
    decode_ack,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import IngestStatus, Liveness
from tilebridge_protocol.topics import (
    INGEST_STATUS_FILTER,
    DeviceTopic,
    device_topic,
    parse_ingest_status_topic,
)
from tilebridge_runtime.mqtt import MqttConnection

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        settings: AgentSettings,
        spool: Spool,
        connection: MqttConnection,
        mailbox: Mailbox,
        on_image_done: Callable[[UUID], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.connection = connection
        self.counters = Counters()
        self.problems = Problems()
        self._mailbox = mailbox
        self._on_image_done = on_image_done
        self._flights: dict[FlightKey, Flight] = {}
        self._by_mid: dict[int, FlightKey] = {}
        # Until the server grants a window: a small one, so a fleet starting at once (or
        # while no ingest runs) cannot fill the broker (docs/protocol.md, "Credits").
        self._budget = Budget(min(settings.inflight_bytes, settings.initial_window_bytes))
        self._cursor = 0
        self._ingest_online: dict[str, bool] = {}
        self._open_resent: dict[UUID, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-publisher", daemon=True)

    # -- wiring (called from other threads: they only post) --------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._mailbox.ring()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def subscribe(self, client: mqtt.Client) -> None:
        """Called on every (re)connect."""
        client.subscribe(device_topic(self.settings.device_id, DeviceTopic.ACK), qos=1)
        client.subscribe(INGEST_STATUS_FILTER, qos=1)
        self._mailbox.ring()

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith(f"/{DeviceTopic.ACK.value}"):
            try:
                self._mailbox.post("ack", decode_ack(bytes(msg.payload)))
            except ProtocolError as exc:
                self._mailbox.post("bad-ack", str(exc))
        elif parse_ingest_status_topic(msg.topic) is not None:
            try:
                status = IngestStatus.model_validate_json(msg.payload)
            except ValueError:
                return
            self._mailbox.post("ingest", (status.instance, status.state is Liveness.ONLINE))

    def on_published(self, mid: int) -> None:
        self._mailbox.post("puback", mid)

    def use_settings(self, settings: AgentSettings) -> None:
        """New transport settings (codec, bandwidth cap) from the next chunk on."""
        self._mailbox.post("settings", settings)

    @property
    def last_error(self) -> str | None:
        return self.problems.latest()

    # -- the owner's loop -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for kind, value in self._mailbox.drain():
                    self._apply(kind, value)
                self._resend_due()
                if not self._fill():
                    self._mailbox.wait(0.05)
                self.problems.clear("publisher")
            except Exception as exc:  # the loop must outlive any single bad item
                expected = isinstance(exc, TransientError)  # e.g. a full spool disk
                self.problems.set("publisher", f"publisher: {exc if expected else repr(exc)}")
                if expected:
                    log.warning("publisher: %s; tried again (an unrecorded ack comes again)", exc)
                else:
                    log.exception("publisher loop")
                self._stop.wait(1.0)

    def _apply(self, kind: str, value: Any) -> None:
        if kind == "puback":
            self._puback(value)
        elif kind == "ack":
            self.problems.clear("ack")
            self._ack(value)
        elif kind == "bad-ack":
            self.problems.set("ack", f"unreadable ack: {value}")
            log.warning("unreadable ack: %s", value)
        elif kind == "ingest":
            instance, online = value
            self._ingest_online[instance] = online
        elif kind == "settings":
            self.settings = value

    def _fill(self) -> bool:
        """Start flights while the budget has room; True if any started."""
        started = False
        while self.connection.connected.is_set() and self._budget.has_room():
            item = self.spool.next_item(self._cursor, timeout=0)
            if item is None:
                break
            self._cursor = item.seq
            self._start(item)
            started = True
        return started

    def _start(self, item: Item) -> None:
        key: FlightKey = (item.kind, item.image_id, item.key)
        if key in self._flights:  # a second record of the same thing
            self.spool.drop(item)
            return
        flight = self._flights[key] = Flight(item)
        if item.kind == "tile":
            self._budget.take(item.nbytes)
        self._observe()
        self._send(key, flight)

    def _send(self, key: FlightKey, flight: Flight) -> None:
        item = flight.item
        for mid in flight.pending_mids:  # PUBACKs that never came must not pin the flight
            self._by_mid.pop(mid, None)
        flight.pending_mids.clear()
        flight.attempts += 1
        flight.resend_now = False
        flight.sent_at = time.monotonic()
        try:
            messages, topic = self._messages(item)
        except FileNotFoundError:  # committed or dropped meanwhile; only the record was left
            self._finish(key)
            self.spool.drop(item)
            return
        for message in messages:
            throttle(self, self.settings.bandwidth_limit_bytes_per_s, len(message), self._stop)
            info = self.connection.publish(topic, message)
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # paho keeps QoS 1 messages queued while disconnected and sends them later.
                flight.pending_mids.add(info.mid)
                self._by_mid[info.mid] = key
        flight.deadline = (
            float("inf") if flight.pending_mids else time.monotonic() + self._timeout(flight)
        )

    def _messages(self, item: Item) -> tuple[Iterator[bytes], str]:
        device = self.settings.device_id
        if item.kind == "tile":
            assert item.key is not None
            data = self.spool.read_tile(item.image_id, item.key)
            s = self.settings
            chunks = encode_tile(item.image_id, item.key, data, s.chunk_size, s.codec,
                                 digest=item.digest)  # fmt: skip
            return chunks, device_topic(device, DeviceTopic.CHUNK)
        return iter([self.spool.payload(item)]), device_topic(device, DeviceTopic(item.kind))

    def _puback(self, mid: int) -> None:
        key = self._by_mid.pop(mid, None)
        flight = self._flights.get(key) if key else None
        if flight is None:
            return
        flight.pending_mids.discard(mid)
        if not flight.pending_mids:
            flight.deadline = time.monotonic() + self._timeout(flight)

    def _timeout(self, flight: Flight) -> float:
        # The exponent is capped: after ~1000 sends 2.0 ** n overflows a float.
        doublings = min(max(0, flight.attempts - 1), 32)
        base = self.settings.commit_timeout_s * 2.0**doublings
        return float(min(self.settings.max_commit_timeout_s, base))

    def _ingest_is_online(self) -> bool:
        """Unknown counts as online: an ingest that never said anything may still answer."""
        return not self._ingest_online or any(self._ingest_online.values())

    def _resend_due(self) -> None:
        if not self.connection.connected.is_set():
            return
        now = time.monotonic()
        online = self._ingest_is_online()
        stuck_after = self.settings.max_commit_timeout_s
        due = [
            (k, f)
            for k, f in self._flights.items()
            if (not f.pending_mids and (f.resend_now or (online and f.deadline <= now)))
            or (f.pending_mids and online and now - f.sent_at > stuck_after)
        ]
        for key, flight in due:
            if not flight.resend_now:
                log.info("no ack for %s %s %s after %d sends; sending again", *key, flight.attempts)
                if flight.attempts >= self.settings.warn_after_sends:
                    kind, image_id, tile = key
                    self.problems.set(
                        ("stuck", key),
                        f"{kind} {tuple(tile) if tile else ''} of image {image_id} got no ack "
                        f"after {flight.attempts} sends while the ingest is online; see its status",
                    )
            self._send(key, flight)

    def _finish(self, key: FlightKey) -> Flight | None:
        flight = self._flights.pop(key, None)
        if flight is None:
            return None
        for mid in flight.pending_mids:
            self._by_mid.pop(mid, None)
        if flight.item.kind == "tile":
            self._budget.give(flight.item.nbytes)
        self.problems.clear(("stuck", key))
        self._observe()
        return flight

    def _observe(self) -> None:
        self.counters.inflight_tiles = sum(1 for k in self._flights if k[0] == "tile")
        self.counters.inflight_bytes = self._budget.used

    # -- acks -------------------------------------------------------------------------------

    def _ack(self, ack: AnyAck) -> None:
        if isinstance(ack, TileAck):
            self._tile_ack(ack)
        elif isinstance(ack, OpenAck):
            self._open_ack(ack)
        elif isinstance(ack, ImageAck):
            self._image_ack(ack)
        elif isinstance(ack, CreditAck):
            # The server's window for this device (fleet flow control, docs/protocol.md):
            # never more than our own cap; 0 pauses new flights, a resend still goes.
            self._budget.limit = min(self.settings.inflight_bytes, ack.window_bytes)
            self.counters.window_bytes = self._budget.limit
        else:
            self._error_ack(ack)

    def _tile_ack(self, ack: TileAck) -> None:
        key: FlightKey = ("tile", ack.image_id, ack.tile)
        flight = self._flights.get(key)
        if ack.state is TileState.COMMITTED:
            # The spool first: if that fails (a full disk) the flight stays, is sent again
            # and acknowledged again; nothing is forgotten that the spool still holds.
            committed = self.spool.tile_committed(ack.image_id, ack.tile)
            self._finish(key)
            if committed:
                self.counters.committed_tiles += 1
                self.counters.committed_bytes += flight.item.nbytes if flight else 0
        elif flight is None:
            return  # about a tile not in flight: its flight will ask again
        elif ack.state is TileState.RETRANSMIT:
            self.counters.retransmits += 1
            log.info("ingest asks for tile %s of %s again: %s", tuple(ack.tile), ack.image_id,
                     ack.reason)  # fmt: skip
            if ack.reason is ReasonCode.UNKNOWN_IMAGE:
                # Its open first; the tile follows the open's acceptance (or its own
                # deadline, should that answer be lost), so an open the ingest refuses for
                # now (a low staging disk) does not bounce every tile back and forth.
                self._resend_open(ack.image_id)
                flight.awaits_open = True
                if not flight.pending_mids:
                    flight.deadline = time.monotonic() + self._timeout(flight)
            else:
                flight.resend_now = True
        else:
            reason = f"{ack.reason}: {ack.detail}"
            self.spool.tile_rejected(flight.item, reason)
            self._finish(key)
            self.counters.rejected_tiles += 1
            self.problems.set(
                ("image", ack.image_id), f"tile of image {ack.image_id} refused: {reason}"
            )
            log.error("tile %s of %s refused: %s", tuple(ack.tile), ack.image_id, reason)

    def _open_ack(self, ack: OpenAck) -> None:
        key: FlightKey = ("open", ack.image_id, None)
        if ack.state is ManifestState.ACCEPTED:
            flight = self._flights.get(key)
            if flight is not None:
                self.spool.drop(flight.item)
                self._finish(key)
            for (_, image_id, _), waiting in self._flights.items():
                if image_id == ack.image_id and waiting.awaits_open:
                    waiting.awaits_open, waiting.resend_now = False, True
            self.problems.clear(("open", ack.image_id))
            return
        # Nothing of this image will ever be accepted: set all of it aside, stop sending.
        reason = f"{ack.reason}: {ack.detail}"
        self.counters.rejected_tiles += self.spool.image_refused(ack.image_id, reason)
        for doomed in [k for k in self._flights if k[1] == ack.image_id]:
            self._finish(doomed)
        self.problems.set(
            ("image", ack.image_id), f"image {ack.image_id} refused by the server: {reason}"
        )
        log.error("image %s refused by the server: %s", ack.image_id, reason)
        self._answered(ack.image_id)

    def _image_ack(self, ack: ImageAck) -> None:
        key: FlightKey = ("close", ack.image_id, None)
        try:
            row = self.spool.image(ack.image_id)
        except UnknownExperimentError:  # forgotten already: a repeated answer
            return
        if key not in self._flights and row.state == "acquiring":
            return  # the image is still being written here; a stale ack from an earlier try
        if self.spool.counts(ack.image_id).pending:
            # Never drop tiles the server does not have; the close is sent again and answered
            # once they are all committed.
            log.warning("image %s: %s ack while tiles are pending here", ack.image_id, ack.state)
            return
        complete = ack.state is ImageState.COMPLETE
        detail = None if complete else f"{ack.reason}: {ack.detail}"
        self.spool.image_done(ack.image_id, complete, detail, dict(ack.locations))
        self._finish(key)
        if complete:
            self.counters.images_complete += 1
            self.problems.clear_images()  # the server stores images again: refusals are history
            log.info("image %s complete: %s", ack.image_id, ack.locations)
        else:
            self.problems.set(
                ("image", ack.image_id), f"image {ack.image_id} failed on the server: {detail}"
            )
            log.error("image %s failed on the server: %s", ack.image_id, detail)
        self._answered(ack.image_id)

    def _error_ack(self, ack: ErrorAck) -> None:
        message = f"ingest refused a message on {ack.topic}: {ack.reason}: {ack.detail}"
        log.warning(message)
        if ack.image_id is None:
            self.problems.set("ingest", message)
            return
        self.problems.set(("image", ack.image_id), message)
        if ack.reason is ReasonCode.UNKNOWN_IMAGE:
            self._resend_open(ack.image_id)
            close = self._flights.get(("close", ack.image_id, None))
            if close is not None and ack.topic.endswith(f"/{DeviceTopic.CLOSE.value}"):
                # The close overtook its open (several ingest instances): again, after it.
                close.resend_now = True

    def _answered(self, image_id: UUID) -> None:
        self._open_resent.pop(image_id, None)
        if self._on_image_done is not None:
            self._on_image_done(image_id)

    def _resend_open(self, image_id: UUID) -> None:
        """The ingest lost or never got the manifest: send it again ahead of the tiles, at
        most once per `commit_timeout_s` however many tiles asked."""
        now = time.monotonic()
        if now - self._open_resent.get(image_id, -float("inf")) < self.settings.commit_timeout_s:
            return
        self._open_resent[image_id] = now
        flight = self._flights.get(("open", image_id, None))
        if flight is not None:
            flight.resend_now = True
            return
        try:
            payload = self.spool.manifest(image_id).to_bytes()
        except UnknownExperimentError:  # forgotten meanwhile
            return
        self.connection.publish(device_topic(self.settings.device_id, DeviceTopic.OPEN), payload)

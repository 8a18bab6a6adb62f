"""Drains the disk buffer to the broker and forgets data only on the server's acks.

One thread ("edge-publisher") owns the flights: items taken from the buffer and published
but not yet acknowledged. The bytes of tiles in flight are capped (`inflight_bytes`), which
bounds memory here and the broker's queue for the ingest, however large the backlog. A tile
whose `committed` ack does not come is published again after `commit_timeout_s`, doubling up
to `max_commit_timeout_s`, but only while the ingest reports itself online: while it is down
the broker keeps what was sent and nothing more piles up there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

import paho.mqtt.client as mqtt

from edge_agent.buffer import DiskBuffer, Item
from edge_agent.ratelimit import throttle
from edge_agent.settings import AgentSettings
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.framing import encode_tile
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    AnyAck,
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

FlightKey = tuple[str, UUID, TileKey | None]


@dataclass
class Flight:
    item: Item
    attempts: int = 0
    pending_mids: set[int] = field(default_factory=set)
    deadline: float = float("inf")
    resend_now: bool = False
    sent_at: float = 0.0


@dataclass
class Counters:
    committed_tiles: int = 0
    committed_bytes: int = 0
    retransmits: int = 0
    rejected_tiles: int = 0
    images_complete: int = 0


class Publisher:
    def __init__(
        self,
        settings: AgentSettings,
        buffer: DiskBuffer,
        connection: MqttConnection,
        on_image_done: Callable[[ImageAck], None] | None = None,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.connection = connection
        self.counters = Counters()
        self.last_error: str | None = None
        self._on_image_done = on_image_done
        self._acks: queue.Queue[AnyAck] = queue.Queue()
        self._flights: dict[FlightKey, Flight] = {}
        self._by_mid: dict[int, FlightKey] = {}
        self._inflight_bytes = 0
        self._ingest_online: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-publisher", daemon=True)
        # Deleting a committed tile costs an unlink and a queue commit (an fsync); a separate
        # thread does it so publishing never waits for it. A crash before it runs only means
        # the tile is sent once more and acknowledged again.
        self._forget: queue.Queue[Item | None] = queue.Queue()
        self._reaper = threading.Thread(target=self._reap, name="edge-reaper", daemon=True)

    # -- wiring -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._forget.put(None)
        if self._reaper.is_alive():
            self._reaper.join(timeout=10)

    def _reap(self) -> None:
        while (item := self._forget.get()) is not None:
            try:
                self.buffer.done(item)
            except Exception:  # the tile is re-sent and re-acknowledged; nothing is lost
                log.exception("forgetting a committed tile")
            finally:
                self._forget.task_done()

    def subscribe(self, client: mqtt.Client) -> None:
        """Called on every (re)connect."""
        client.subscribe(device_topic(self.settings.device_id, DeviceTopic.ACK), qos=1)
        client.subscribe(INGEST_STATUS_FILTER, qos=1)

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith(f"/{DeviceTopic.ACK.value}"):
            try:
                self._acks.put(decode_ack(bytes(msg.payload)))
            except ProtocolError as exc:
                self.last_error = f"unreadable ack: {exc}"
                log.warning(self.last_error)
        elif parse_ingest_status_topic(msg.topic) is not None:
            try:
                status = IngestStatus.model_validate_json(msg.payload)
            except ValueError:
                return
            with self._lock:
                self._ingest_online[status.instance] = status.state is Liveness.ONLINE

    def on_published(self, mid: int) -> None:
        with self._lock:
            key = self._by_mid.pop(mid, None)
            flight = self._flights.get(key) if key else None
            if flight is None:
                return
            flight.pending_mids.discard(mid)
            if not flight.pending_mids:
                flight.deadline = time.monotonic() + self._timeout(flight.attempts)

    # -- observation ------------------------------------------------------------------------

    @property
    def inflight(self) -> tuple[int, int]:
        with self._lock:
            tiles = sum(1 for k in self._flights if k[0] == "tile")
            return tiles, self._inflight_bytes

    def ingest_online(self) -> bool:
        """Unknown counts as online: an ingest that never said anything may still answer."""
        with self._lock:
            return not self._ingest_online or any(self._ingest_online.values())

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_acks()
                self._resend_due()
                if self.connection.connected.is_set() and self._has_room():
                    item = self.buffer.next_item(timeout=0.05)
                    if item is not None:
                        self._start(item)
                else:
                    self._stop.wait(0.05)
            except Exception as exc:  # the loop must outlive any single bad item
                self.last_error = f"publisher: {exc!r}"
                log.exception("publisher loop")
                self._stop.wait(1.0)

    def _has_room(self) -> bool:
        with self._lock:
            return self._inflight_bytes < self.settings.inflight_bytes

    def _start(self, item: Item) -> None:
        key: FlightKey = (item.kind, item.image_id, item.key)
        with self._lock:
            duplicate = key in self._flights
        if duplicate:  # a second record of the same thing (crash between file and log)
            self.buffer.done_record(item)
            return
        flight = Flight(item)
        with self._lock:
            self._flights[key] = flight
            if item.kind == "tile":
                self._inflight_bytes += item.nbytes
        self._send(key, flight)

    def _send(self, key: FlightKey, flight: Flight) -> None:
        item = flight.item
        device = self.settings.device_id
        with self._lock:
            # PUBACKs that never came (a broker that lost its session) must not pin the tile.
            for mid in flight.pending_mids:
                self._by_mid.pop(mid, None)
            flight.pending_mids.clear()
            flight.sent_at = time.monotonic()
        flight.attempts += 1
        flight.resend_now = False
        flight.deadline = float("inf")
        if item.kind == "tile":
            assert item.key is not None
            try:
                data = self.buffer.read_tile(item.image_id, item.key)
            except FileNotFoundError:  # committed before a crash; only the record was left
                self._finish(key, flight)
                self.buffer.done_record(item)
                return
            messages = encode_tile(
                item.image_id,
                item.key,
                data,
                self.settings.chunk_size,
                self.settings.codec,
                digest=item.digest,
            )
            topic = device_topic(device, DeviceTopic.CHUNK)
        else:
            try:
                messages = iter([self.buffer.message(item)])
            except FileNotFoundError:  # the image completed and was forgotten meanwhile
                self._finish(key, flight)
                self.buffer.done_record(item)
                return
            topic = device_topic(device, DeviceTopic(item.kind))
        for message in messages:
            throttle(self, self.settings.bandwidth_limit_bytes_per_s, len(message), self._stop)
            info = self.connection.publish(topic, message)
            with self._lock:
                if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    # paho keeps QoS 1 messages queued while disconnected and sends them later.
                    flight.pending_mids.add(info.mid)
                    self._by_mid[info.mid] = key
        with self._lock:
            if not flight.pending_mids:
                flight.deadline = time.monotonic() + self._timeout(flight.attempts)

    def _timeout(self, attempts: int) -> float:
        base = self.settings.commit_timeout_s * 2.0 ** max(0, attempts - 1)
        return float(min(self.settings.max_commit_timeout_s, base))

    def _resend_due(self) -> None:
        if not self.connection.connected.is_set():
            return
        now = time.monotonic()
        online = self.ingest_online()
        stuck_after = self.settings.max_commit_timeout_s
        with self._lock:
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
                    self.last_error = (
                        f"{kind} {tuple(tile) if tile else ''} of image {image_id} got no ack "
                        f"after {flight.attempts} sends while the ingest is online; see its status"
                    )
            self._send(key, flight)

    def _finish(self, key: FlightKey, flight: Flight) -> None:
        with self._lock:
            self._flights.pop(key, None)
            for mid in flight.pending_mids:
                self._by_mid.pop(mid, None)
            if flight.item.kind == "tile":
                self._inflight_bytes -= flight.item.nbytes

    # -- acks -------------------------------------------------------------------------------

    def _drain_acks(self) -> None:
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                return
            if isinstance(ack, TileAck):
                self._tile_ack(ack)
            elif isinstance(ack, OpenAck):
                self._open_ack(ack)
            elif isinstance(ack, ImageAck):
                self._image_ack(ack)
            else:
                self.last_error = (
                    f"ingest refused a message on {ack.topic}: {ack.reason}: {ack.detail}"
                )
                log.warning(self.last_error)
                if ack.reason is ReasonCode.UNKNOWN_IMAGE and ack.image_id is not None:
                    self._resend_open(ack.image_id)

    def _tile_ack(self, ack: TileAck) -> None:
        key: FlightKey = ("tile", ack.image_id, ack.tile)
        with self._lock:
            flight = self._flights.get(key)
        if flight is None:
            return  # a duplicate ack, or for a tile still waiting in the buffer: harmless
        if ack.state is TileState.COMMITTED:
            self._finish(key, flight)
            self._forget.put(flight.item)
            self.counters.committed_tiles += 1
            self.counters.committed_bytes += flight.item.nbytes
        elif ack.state is TileState.RETRANSMIT:
            self.counters.retransmits += 1
            log.info(
                "ingest asks for tile %s of %s again: %s", tuple(ack.tile), ack.image_id, ack.reason
            )
            if ack.reason is ReasonCode.UNKNOWN_IMAGE:
                self._resend_open(ack.image_id)
            with self._lock:
                flight.resend_now = True
        else:
            self._reject(key, flight, f"{ack.reason}: {ack.detail}")

    def _open_ack(self, ack: OpenAck) -> None:
        key: FlightKey = ("open", ack.image_id, None)
        with self._lock:
            flight = self._flights.get(key)
        if ack.state is ManifestState.ACCEPTED:
            if flight is not None:
                self._finish(key, flight)
                self.buffer.done(flight.item)
        else:
            # Nothing of this image will ever be accepted: set all of it aside, stop sending.
            reason = f"{ack.reason}: {ack.detail}"
            with self._lock:
                doomed = [(k, f) for k, f in self._flights.items() if k[1] == ack.image_id]
            for doomed_key, doomed_flight in doomed:
                self._finish(doomed_key, doomed_flight)
                self.buffer.done_record(doomed_flight.item)
            rejected = self.buffer.set_aside_image(ack.image_id, reason)
            self.counters.rejected_tiles += rejected
            self.last_error = f"image {ack.image_id} refused by the server: {reason}"
            log.error(self.last_error)

    def _image_ack(self, ack: ImageAck) -> None:
        key: FlightKey = ("close", ack.image_id, None)
        with self._lock:
            flight = self._flights.get(key)
        if (
            flight is None
            and self.buffer.is_open(ack.image_id)
            and not self.buffer.is_closed(ack.image_id)
        ):
            return  # the image is still being written here; a stale ack from an earlier try
        self._forget.join()  # committed tiles still being deleted are not pending
        if self.buffer.pending_tiles(ack.image_id):
            # Never drop tiles the server does not have; the close is sent again and answered
            # once they are all committed.
            log.warning("image %s: %s ack while tiles are pending here", ack.image_id, ack.state)
            return
        if flight is not None:
            self._finish(key, flight)
            self.buffer.done(flight.item)
        if ack.state is ImageState.FAILED:
            self.last_error = (
                f"image {ack.image_id} failed on the server: {ack.reason}: {ack.detail}"
            )
            log.error(self.last_error)
        else:
            self.counters.images_complete += 1
            log.info("image %s complete: %s", ack.image_id, ack.locations)
        self.buffer.forget_image(ack.image_id)
        if self._on_image_done is not None:
            self._on_image_done(ack)

    def _reject(self, key: FlightKey, flight: Flight, reason: str) -> None:
        self._finish(key, flight)
        self.buffer.set_aside(flight.item, reason)
        if flight.item.kind == "tile":
            self.counters.rejected_tiles += 1
        self.last_error = f"{flight.item.kind} of image {flight.item.image_id} refused: {reason}"
        log.error(self.last_error)

    def _resend_open(self, image_id: UUID) -> None:
        """The ingest lost or never got the manifest: send it again ahead of the tiles."""
        if not self.buffer.is_open(image_id):
            return
        key: FlightKey = ("open", image_id, None)
        with self._lock:
            flight = self._flights.get(key)
        if flight is None:
            payload = self.buffer.open_payload(image_id)
            self.connection.publish(
                device_topic(self.settings.device_id, DeviceTopic.OPEN), payload
            )
        else:
            with self._lock:
                flight.resend_now = True

"""The core: one thread ("ingest-core") that owns every image's state and applies events in
order from one inbox. docs/architecture.md draws the whole model; in short:

* the broker's network thread only puts device messages into the inbox (`Inbox.from_network`
  blocks when `inbox_messages` wait: backpressure to the broker) and sends what the core
  publishes;
* staging, ledger and storer work runs on their own threads; the core hands it out (never
  waiting) and their results come back through the same inbox;
* an ack that lets a device forget data is sent only when the ledger says the records that
  justify it are durable (`Persist` effects and `Durable` events);
* status and metrics read `snapshot`, a frozen copy replaced when something changed.

No exception escapes the loop: a device message the core fails on is answered with
`internal_error`, counted, logged and kept in the dead-letter store. A bug elsewhere in the
loop ends the thread, and `tilebridge_runtime.process` ends the process, so systemd restarts
it on its durable state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from itertools import count

from server_ingest import events as ev
from server_ingest.flow import Windows
from server_ingest.inbox import Inbox
from server_ingest.intake import Intake
from server_ingest.ledger.records import HOLDS_STAGED_TILES, DeadLettered, ImageKey, StoredImage
from server_ingest.lifecycle import (
    Effect,
    Event,
    Forget,
    Opened,
    Persist,
    Policy,
    Publish,
    RemoveStaging,
    Send,
    StoreBegin,
    StoreCancel,
    StoreFinish,
    StoreTile,
    Tick,
    clip,
    step,
)
from server_ingest.ports import LedgerPort, Outbox, PreviewPort, StagerPort, StorerPort
from server_ingest.routing import Router
from server_ingest.settings import Limits, Retention
from server_ingest.stager import Job, RemoveImage, SweepKept
from server_ingest.state import CoreState, ImageBook, Snapshot, finished_image
from server_ingest.status import image_status
from server_ingest.storer import Begin, Cancel, Finish, Tile
from server_ingest.upkeep import Upkeep
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.messages import (
    AnyAck,
    CreditAck,
    ErrorAck,
    ManifestState,
    OpenAck,
    TileAck,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_protocol.topics import DeviceTopic, parse_device_topic

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 0.5
LOG_EVERY_S = 1.0
SNAPSHOT_EVERY_S = 0.2


class Core:
    def __init__(
        self,
        inbox: Inbox,
        limits: Limits,
        policy: Policy,
        ledger: LedgerPort,
        stager: StagerPort,
        storer: StorerPort,
        outbox: Outbox,
        dead_letter_bytes: int = 64 * 1024,
        backends: tuple[str, ...] = (),
        on_idle: Callable[[int], None] | None = None,
        router: Router | None = None,
        windows: Windows | None = None,
        clock: Callable[[], float] = time.time,
        retention: Retention | None = None,
        keep_staged: bool = False,
        preview: PreviewPort | None = None,
    ) -> None:
        self._preview = preview
        self.retention = retention or Retention()
        self.inbox, self.limits, self.policy = inbox, limits, policy
        # Wall-clock time of the events (expiry, records); injected so tests can jump ahead.
        self._clock = clock
        self._ledger, self._stager, self._storer, self._outbox = ledger, stager, storer, outbox
        self._dead_letter_bytes = dead_letter_bytes
        self._on_idle = on_idle
        self._router, self._windows = router, windows  # several instances; flow control
        self.state = CoreState(limits)
        self.state.stats.backends.update(dict.fromkeys(backends, "ok"))
        self.intake = Intake(self.state, self, limits)
        self.upkeep = Upkeep(self.state, self, stager, self.retention, keep_staged)
        self.snapshot = Snapshot()
        self._tokens = count(1)
        self._pending: dict[int, tuple[str | None, ImageKey | None, tuple[Effect, ...]]] = {}
        self._parked: dict[ImageKey, list[ev.Inbound]] = {}
        self._waiting: list[int] = []
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._dirty, self._snapshot_at = True, 0.0
        self._tick_s = min(60.0, policy.image_ttl_s / 10, self.retention.check_interval_s)
        self._ticked = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ingest-core", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.inbox.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def recover(self, images: list[StoredImage]) -> None:
        """Before start: hold every image whose tiles are staged; resume their storing."""
        now = self.now()
        for stored in images:
            book = ImageBook.loaded(stored, now)
            self.state.hold(book)
            if book.image.phase in (Phase.RECEIVING, Phase.STORING):
                self._execute(book.image.key, (StoreBegin(),))
            if book.image.phase is Phase.STORING:
                self._execute(book.image.key, (StoreFinish(),))
        self._publish_snapshot()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # While something changed, wake up soon enough to publish it even when idle.
            item = self.inbox.get(timeout=SNAPSHOT_EVERY_S if self._dirty else self._tick_s)
            if item == "stop":
                return
            if item != "timeout":
                self._handle(item)
            if time.monotonic() - self._ticked >= self._tick_s:
                self._tick()
            if self._waiting and self._idle():
                self._publish_snapshot()
                for token in self._waiting:
                    if self._on_idle:
                        self._on_idle(token)
                self._waiting.clear()
            if self._dirty and time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S:
                self._publish_snapshot()

    def _handle(self, item: ev.InboxItem) -> None:
        self._dirty = True
        if isinstance(item, ev.Inbound):
            try:
                self._inbound(item)
            finally:
                self.inbox.release()
        elif isinstance(item, ev.ChunkWritten | ev.TileSealed | ev.StagingDone):
            key = item.key if isinstance(item, ev.StagingDone) else item.ref.key
            self._io_done(key)
            if isinstance(item, ev.ChunkWritten):
                self.intake.tiles.written(item)
            elif isinstance(item, ev.TileSealed):
                self.intake.tiles.sealed(item)
        elif isinstance(item, ev.Durable):
            for token in item.tokens:
                device, about, then = self._pending.pop(token, (None, None, ()))
                self._execute(about, then, device)
        elif isinstance(item, ev.Looked):
            self._looked(item)
        elif isinstance(item, ev.ForImage):
            self.apply(item.key, item.event)
        elif isinstance(item, ev.LedgerTrouble):
            self.state.stats.ledger_trouble = item.detail
        elif isinstance(item, ev.BackendHealth):
            self.state.stats.backends[item.backend] = item.state
        elif isinstance(item, ev.StoreAttempt):
            self.state.stats.observe_store(item.backend, item.outcome, item.seconds, item.nbytes)
        elif isinstance(item, ev.Owner):
            self._owner(item)
        elif isinstance(item, ev.AdminRequest | ev.DiskSpace | ev.StagingSwept):
            self.upkeep.handle(item)
        else:
            self._waiting.append(item.token)

    def _inbound(self, message: ev.Inbound, replay: bool = False) -> None:
        try:
            device, kind = parse_device_topic(message.topic)
        except ProtocolError as exc:
            self.refuse("?", exc.reason, f"message on {message.topic!r}: {exc.detail}")
            return
        if (
            not replay
            and self._router
            and not self._router.admit(device, message, time.monotonic())
        ):
            return  # another instance holds the device (relayed), or asked who does
        if not replay and self._windows is not None:
            window = self._windows.seen(device, time.monotonic())
            if window is not None:
                self._outbox.ack(device, CreditAck(window_bytes=window))
        try:
            if not replay:
                self.state.stats.messages[kind.value] += 1
                book, now = self.state.device(device), time.monotonic()
                parse = kind in (DeviceTopic.OPEN, DeviceTopic.CLOSE)
                if not book.bucket.take(now) or (
                    parse and not book.json_bucket.take(now, len(message.payload))
                ):
                    self._rate_limited(device, message.topic)
                    return
                if message.retained:
                    raise ProtocolError(
                        ReasonCode.MALFORMED,
                        "a retained message on a device "
                        "topic: devices never retain, so it is not processed",
                    )
            self.intake.message(device, kind, message)
        except ProtocolError as exc:
            self.refuse(device, exc.reason, f"{kind.value} from {device}: {exc.detail}")
            self.send(
                device, ErrorAck(reason=exc.reason, detail=_clip(exc.detail), topic=message.topic)
            )
        except Exception as exc:
            # A bug or an input nobody foresaw costs this one message, never the ingest.
            log.exception("unexpected error on %s from %s", kind.value, device)
            detail = _clip(f"the ingest failed on this message: {type(exc).__name__}: {exc}")
            self.refuse(device, ReasonCode.INTERNAL_ERROR, f"{kind.value} from {device}: {detail}")
            self.send(
                device,
                ErrorAck(reason=ReasonCode.INTERNAL_ERROR, detail=detail, topic=message.topic),
            )
            letter = DeadLettered(
                self.now(),
                device,
                message.topic,
                ReasonCode.INTERNAL_ERROR,
                detail,
                message.payload[: self._dead_letter_bytes],
                len(message.payload),
            )
            self._persist(None, Persist((letter,)))

    def _rate_limited(self, device: str, topic: str) -> None:
        limits = self.limits
        detail = (
            f"{device} sends more than {limits.message_rate_per_device:g} messages/s (burst "
            f"{limits.message_burst_per_device}) or {limits.json_bytes_per_s_per_device:g} "
            "manifest bytes/s: not processed"
        )
        self.state.stats.rejections[ReasonCode.RATE_LIMITED.value] += 1
        if self.state.device(device).should_tell(ReasonCode.RATE_LIMITED, time.monotonic()):
            self.refuse(device, ReasonCode.RATE_LIMITED, detail, counted=True)
            self.send(device, ErrorAck(reason=ReasonCode.RATE_LIMITED, detail=detail, topic=topic))

    # -- Driver (what the intake asks of the core) ---------------------------------------------

    def apply(self, key: ImageKey, event: Event, manifest_size: int = 0) -> None:
        book = self.state.images.get(key)
        image = book.image if book is not None else self.state.finished.get(key)
        result = step(image, key, event, self.policy)
        if (
            result.image is not None
            and result.image.phase is Phase.FAILED
            and (image is None or image.phase is not Phase.FAILED)
        ):
            self.state.stats.failed[str(result.image.reason)] += 1
        if result.image is not None:
            if book is not None and result.image.phase is not book.image.phase:
                book.phase_since = self.now()
            if book is None and result.image.phase in HOLDS_STAGED_TILES:
                assert isinstance(event, Opened)  # the only way into a phase with tiles
                book = ImageBook(
                    result.image,
                    event.manifest,
                    manifest_size=manifest_size,
                    phase_since=self.now(),
                )
                self.state.hold(book)
            elif book is not None:
                book.image = result.image
            else:
                self.state.remember(result.image)
        self._execute(key, result.effects)

    def send(self, device: str, ack: AnyAck) -> None:
        if _refusal(ack) and not self.state.device(device).answers.take(time.monotonic()):
            self.state.stats.unanswered += 1  # a flood of bad messages: counted, not answered
            return
        self._outbox.ack(device, ack)

    def after_durable(self, device: str, ack: AnyAck) -> None:
        self._persist(None, Persist((), (Send(ack),)), device)

    def refuse(self, device: str, reason: str, detail: str, counted: bool = False) -> None:
        """Count a refusal and say so; a flood of them is logged once a second per device and
        reason (with how many were not logged), never once a message."""
        detail = _clip(detail)
        if not counted:
            self.state.stats.rejections[str(reason)] += 1
        self.state.stats.last_error = detail
        now, key = time.monotonic(), (device, str(reason))
        logged, quiet = self._logged.get(key, (-LOG_EVERY_S, 0))
        if now - logged < LOG_EVERY_S:
            self._logged[key] = (logged, quiet + 1)
            return
        self._logged[key] = (now, 0)
        more = f" (and {quiet} more like it since the last)" if quiet else ""
        log.warning("refused %s%s", detail, more)

    def stage(self, job: Job) -> None:
        assert not isinstance(job, SweepKept)  # about no image: submitted by `_sweep`
        key = job.key if isinstance(job, RemoveImage) else job.ref.key
        self.state.io[key] += 1
        self._stager.submit(job)

    def park(self, key: ImageKey, message: ev.Inbound) -> bool:
        """Hold `message` until the ledger says what it knows of `key`; False if too many are
        held for the device (then the image counts as unknown for this message)."""
        device = self.state.device(key.device)
        if device.parked_bytes + len(message.payload) > self.limits.max_parked_bytes_per_device:
            return False
        device.parked_bytes += len(message.payload)
        waiting = self._parked.setdefault(key, [])
        if not waiting:
            self._ledger.lookup(key)
        waiting.append(message)
        return True

    def publish(self, key: ImageKey, force: bool) -> None:
        book = self.state.images.get(key)
        if book is None:
            return
        now = time.monotonic()
        if not force and now - book.last_published < PUBLISH_EVERY_S:
            return
        book.last_published = now
        # A failed or abandoned image still staged keeps its status until an admin acts:
        # only an image that needs nothing more expires from the broker.
        phase = book.image.phase
        done = phase in (Phase.COMPLETE, Phase.REJECTED, Phase.DISCARDED) or (
            phase is Phase.EXPIRED and not book.staged
        )
        self._outbox.image_status(image_status(book), done)
        if self._preview is not None and phase not in (Phase.RECEIVING, Phase.STORING):
            self._preview.done(key)

    def now(self) -> float:
        return self._clock()

    # -- effects ------------------------------------------------------------------------------

    def _execute(
        self, key: ImageKey | None, effects: tuple[Effect, ...], device: str | None = None
    ) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                target = key.device if key is not None else device
                assert target is not None
                self.send(target, effect.ack)
            elif isinstance(effect, Persist):
                self._persist(key, effect)
            elif key is not None:
                self._image_effect(key, effect)

    def _persist(self, key: ImageKey | None, persist: Persist, device: str | None = None) -> None:
        token = next(self._tokens)
        self._pending[token] = (device, key, persist.then)
        self._ledger.persist(persist.records, token)

    def _image_effect(self, key: ImageKey, effect: Effect) -> None:
        book = self.state.images.get(key)
        if isinstance(effect, Publish):
            self.publish(key, effect.force)
        elif isinstance(effect, Forget):
            self.state.let_go(key)
        elif isinstance(effect, RemoveStaging):
            if self.state.io[key]:
                self.state.remove_when_idle.add(key)
            else:
                self.stage(RemoveImage(key))
        elif isinstance(effect, StoreCancel):
            self._storer.submit(Cancel(key))
        elif book is None:
            return
        elif isinstance(effect, StoreBegin):
            done = frozenset(name for name, _ in book.image.locations)
            self._storer.submit(Begin(key, book.manifest, done, tuple(book.staged)))
        elif isinstance(effect, StoreTile):
            self._storer.submit(Tile(key, effect.tile))
            if self._preview is not None:
                self._preview.tile(key, book.manifest, effect.tile)
        elif isinstance(effect, StoreFinish) and book.close is not None:
            self._storer.submit(Finish(key, book.close))

    def _io_done(self, key: ImageKey) -> None:
        self.state.io[key] -= 1
        if self.state.io[key] <= 0:
            del self.state.io[key]
            if key in self.state.remove_when_idle:
                self.state.remove_when_idle.discard(key)
                self.stage(RemoveImage(key))

    # -- ledger answers, time, idleness -------------------------------------------------------

    def _looked(self, item: ev.Looked) -> None:
        key, stored = item.key, item.image
        if key not in self.state.images and stored is not None:
            if stored.phase in HOLDS_STAGED_TILES and stored.manifest is not None:
                self.state.hold(ImageBook.loaded(stored, self.now()))
            else:
                self.state.remember(finished_image(stored))
        parked = self._parked.pop(key, [])
        self.state.device(key.device).parked_bytes -= sum(len(m.payload) for m in parked)
        if stored is None:
            self.state.absent[key] = None
        try:
            for message in parked:
                self._inbound(message, replay=True)
        finally:
            self.state.absent.pop(key, None)

    def _owner(self, item: ev.Owner) -> None:
        """Who holds a device now; if we just took it over, hold and resume its images."""
        assert self._router is not None
        adopted = [image for image in item.images if image.key not in self.state.images]
        if adopted:
            self.recover(adopted)
        for message in self._router.answered(item, time.monotonic()):
            self._inbound(message)

    def _tick(self) -> None:
        self._ticked = time.monotonic()
        at = self.now()
        for key, book in list(self.state.images.items()):
            if book.image.phase is Phase.RECEIVING:
                self.apply(key, Tick(at))
        self.upkeep.tick(at)

    def _idle(self) -> bool:
        return not (self._pending or self._parked or self.state.io)

    def _publish_snapshot(self) -> None:
        self.snapshot = self.state.snapshot()
        self._dirty, self._snapshot_at = False, time.monotonic()


def _refusal(ack: AnyAck) -> bool:
    """An answer that refuses something (rather than one that lets the device go on)."""
    if isinstance(ack, ErrorAck):
        return True
    if isinstance(ack, TileAck):
        return ack.state is not TileState.COMMITTED
    return isinstance(ack, OpenAck) and ack.state is ManifestState.REJECTED


def _clip(text: str) -> str:
    return clip(text) or ""

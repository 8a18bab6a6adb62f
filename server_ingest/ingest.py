"""The ingest's message handling: verify, reassemble, stage, record, acknowledge.

`Ingest.handle(topic, payload)` is called for every message from the broker. It never raises
for bad input: a message that breaks the protocol is answered with a reason code and logged;
a transient fault (e.g. a full staging disk) leaves the message unacknowledged, so the device
sends it again later. Writing finished images to the backends happens on `Storer` threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from uuid import UUID

from server_ingest.assembler import Added, TileAssembly
from server_ingest.ledger import ImageRecord, Ledger, Phase
from server_ingest.settings import Limits
from server_ingest.staging import Staging
from tilebridge_protocol.errors import ProtocolError, TransientError
from tilebridge_protocol.framing import ChunkHeader, decode_chunk, peek_identity
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    AnyAck,
    CloseManifest,
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    OpenManifest,
    TileAck,
    TileState,
    decode_close,
    decode_open,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic, parse_device_topic

log = logging.getLogger(__name__)

Ack = AnyAck


class Outbox(Protocol):
    """Where the ingest's answers go (the broker in production, a list in unit tests)."""

    def ack(self, device: str, ack: Ack) -> None: ...

    def image_changed(self, record: ImageRecord, progress: ImageProgress) -> None: ...


class Scheduler(Protocol):
    """The storer: feeds backends while tiles arrive (see storer.py)."""

    def begin(self, image_id: UUID) -> None: ...

    def tile_ready(self, image_id: UUID, key: TileKey) -> None: ...

    def finish(self, image_id: UUID) -> None: ...


@dataclass
class ImageProgress:
    committed: int = 0
    partial: int = 0
    stored: int = 0
    last_published: float = 0.0


@dataclass
class Stats:
    messages: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    tiles_committed: int = 0
    last_error: str | None = None


class Ingest:
    def __init__(
        self, ledger: Ledger, staging: Staging, outbox: Outbox, storer: Scheduler, limits: Limits
    ) -> None:
        self.ledger = ledger
        self.staging = staging
        self.outbox = outbox
        self.storer = storer
        self.limits = limits
        self.stats = Stats()
        self._records: dict[UUID, ImageRecord] = {}
        self._staged: dict[UUID, dict[TileKey, bytes]] = {}
        self._assemblies: dict[tuple[UUID, TileKey], TileAssembly] = {}
        self._sealing: dict[tuple[UUID, TileKey], Future[None]] = {}
        self._sealer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-seal")
        self._progress: dict[UUID, ImageProgress] = {}
        self._lock = threading.RLock()

    # -- entry point ------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        try:
            device, kind = parse_device_topic(topic)
        except ProtocolError as exc:
            self._note_rejection(exc.reason, f"message on {topic!r}: {exc.detail}")
            return
        self.stats.messages[kind.value] += 1
        try:
            with self._lock:
                if kind is DeviceTopic.CHUNK:
                    self._chunk(device, payload)
                elif kind is DeviceTopic.OPEN:
                    self._open(device, payload)
                elif kind is DeviceTopic.CLOSE:
                    self._close(device, payload)
                else:
                    raise ProtocolError(
                        ReasonCode.MALFORMED, f"{kind.value} is not sent to the ingest"
                    )
        except ProtocolError as exc:
            exc.detail = _clip(exc.detail)
            self._note_rejection(exc.reason, f"{kind.value} from {device}: {exc.detail}")
            self.outbox.ack(device, ErrorAck(reason=exc.reason, detail=exc.detail, topic=topic))
        except TransientError as exc:
            # Not acknowledged: the device keeps the data and sends it again after its timeout.
            self.stats.last_error = f"{kind.value} from {device} not staged: {exc}"
            log.error(self.stats.last_error)
        except Exception as exc:
            # A bug or an input nobody foresaw must cost this one message, never the broker
            # thread: every other device depends on it. The device is told; nothing is staged.
            log.exception("unexpected error on %s from %s", kind.value, device)
            detail = _clip(f"the ingest failed on this message: {type(exc).__name__}: {exc}")
            self._note_rejection(ReasonCode.INTERNAL_ERROR, f"{kind.value} from {device}: {detail}")
            self.outbox.ack(
                device, ErrorAck(reason=ReasonCode.INTERNAL_ERROR, detail=detail, topic=topic)
            )

    # -- open -------------------------------------------------------------------------------

    def _open(self, device: str, payload: bytes) -> None:
        try:
            manifest = _decoded(decode_open, payload)
            self._check_limits(manifest)
        except ProtocolError as exc:
            exc.detail = _clip(exc.detail)
            image_id = _peek_image_id(payload)
            if image_id is None:
                raise
            self._note_rejection(exc.reason, f"open of {image_id} from {device}: {exc.detail}")
            if self.ledger.image(image_id) is None:
                self.ledger.reject_image(device, image_id, f"{exc.reason}: {exc.detail}")
                self._records.pop(image_id, None)
            self.outbox.ack(device, OpenAck(image_id=image_id, state=ManifestState.REJECTED,
                                            reason=exc.reason, detail=exc.detail))  # fmt: skip
            return
        record = self._record(manifest.image_id)
        if record is None or _refused_before(record, device):
            # An image whose earlier open was unreadable gets a second chance with a valid one.
            self.ledger.add_image(device, manifest)
            self._records.pop(manifest.image_id, None)
            record = self._record(manifest.image_id)
            assert record is not None
            log.info(
                "image %s opened by %s: %s tiles", manifest.image_id, device, manifest.tile_count
            )
            self.storer.begin(manifest.image_id)
        elif record.device != device or record.manifest != manifest:
            detail = "image id already used by another device or with another manifest"
            self._refuse_open(device, manifest.image_id, ReasonCode.CONFLICT, detail)
            return
        if record.phase is Phase.REJECTED:
            self._refuse_open(
                device, manifest.image_id, ReasonCode.INVALID_MANIFEST, record.error or ""
            )
            return
        self.outbox.ack(device, OpenAck(image_id=manifest.image_id, state=ManifestState.ACCEPTED))
        if record.phase is Phase.COMPLETE or (
            record.phase is Phase.FAILED and self._all_in(record)
        ):
            self._image_ack(record)
        self._publish_progress(record, force=True)

    def _refuse_open(self, device: str, image_id: UUID, reason: ReasonCode, detail: str) -> None:
        self._note_rejection(reason, f"open of {image_id} from {device}: {detail}")
        self.outbox.ack(device, OpenAck(image_id=image_id, state=ManifestState.REJECTED,
                                        reason=reason, detail=detail))  # fmt: skip

    def _check_limits(self, m: OpenManifest) -> None:
        lim = self.limits
        if m.tile_bytes > lim.max_tile_bytes:
            raise ProtocolError(
                ReasonCode.QUOTA_EXCEEDED, f"tile of {m.tile_bytes} bytes > {lim.max_tile_bytes}"
            )
        if m.tile_count > lim.max_tiles_per_image:
            raise ProtocolError(
                ReasonCode.QUOTA_EXCEEDED, f"{m.tile_count} tiles > {lim.max_tiles_per_image}"
            )
        if m.tile_count * m.tile_bytes > lim.max_image_bytes:
            raise ProtocolError(
                ReasonCode.QUOTA_EXCEEDED,
                f"image of {m.tile_count * m.tile_bytes} bytes > {lim.max_image_bytes}",
            )
        if m.tile_count * m.tile_bytes > lim.max_staged_bytes_per_device:
            raise ProtocolError(
                ReasonCode.QUOTA_EXCEEDED,
                f"image of {m.tile_count * m.tile_bytes} bytes > the device's staging quota "
                f"{lim.max_staged_bytes_per_device}",
            )

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, device: str, payload: bytes) -> None:
        try:
            header, raw = decode_chunk(payload, self.limits.max_chunk_bytes)
        except ProtocolError as exc:
            ident = peek_identity(payload)
            if ident is None:
                raise
            image_id, key = ident
            state = (
                TileState.RETRANSMIT
                if exc.reason is ReasonCode.BAD_CHECKSUM
                else TileState.REJECTED
            )
            self._note_rejection(
                exc.reason, f"chunk of {image_id} {tuple(key)} from {device}: {exc.detail}"
            )
            self._tile_ack(device, image_id, key, state, exc.reason, exc.detail)
            return
        image_id, key = header.image_id, header.tile
        record = self._record(image_id)
        if record is None:
            self._tile_ack(device, image_id, key, TileState.RETRANSMIT, ReasonCode.UNKNOWN_IMAGE,
                           "no open manifest for this image: send open, then the tile")  # fmt: skip
            return
        refusal = self._refusal(device, record, header)
        if refusal is not None:
            self._note_rejection(
                refusal[0], f"chunk of {image_id} {tuple(key)} from {device}: {refusal[1]}"
            )
            self._tile_ack(device, image_id, key, TileState.REJECTED, *refusal)
            return
        staged = self._staged_tiles(image_id).get(key)
        if staged is not None:
            if staged != header.tile_digest:
                self._tile_ack(device, image_id, key, TileState.REJECTED, ReasonCode.CONFLICT,
                               "this tile was already committed with other content")  # fmt: skip
            elif header.chunk_index == header.chunk_count - 1:
                self._tile_ack(device, image_id, key, TileState.COMMITTED)  # a resend: ack again
            return
        if (image_id, key) in self._sealing:
            return  # a resend racing the seal of the same tile: its commit ack is on the way
        self._place(device, record, header, raw)

    def _refusal(
        self, device: str, record: ImageRecord, header: ChunkHeader
    ) -> tuple[ReasonCode, str] | None:
        if record.device != device:
            return ReasonCode.CONFLICT, "the image belongs to another device"
        if record.phase is Phase.REJECTED or record.manifest is None:
            return ReasonCode.INVALID_MANIFEST, f"the image was refused: {record.error}"
        m = record.manifest
        if not m.has_tile(header.tile):
            return ReasonCode.OUT_OF_RANGE, f"tile {tuple(header.tile)} is not in the manifest"
        if header.tile_bytes != m.tile_bytes:
            return (
                ReasonCode.OUT_OF_RANGE,
                f"tile of {header.tile_bytes} bytes, manifest says {m.tile_bytes}",
            )
        return None

    def _place(self, device: str, record: ImageRecord, header: ChunkHeader, raw: bytes) -> None:
        image_id, key = header.image_id, header.tile
        slot = (image_id, key)
        assembly = self._assemblies.get(slot)
        fresh = assembly is None
        if assembly is not None:
            added = assembly.add(header)
            if added is Added.DUPLICATE:
                return
            if added is Added.CONFLICT:
                # e.g. the device restarted with another chunk size: start this tile over.
                log.info("tile %s of %s restarted by a conflicting chunk", tuple(key), image_id)
                fresh = True
        if fresh:
            if self._partials(device) >= self.limits.max_partial_tiles_per_device:
                raise TransientError(f"{device} has too many tiles in reassembly")
            staged, quota = self._staged_bytes(device), self.limits.max_staged_bytes_per_device
            if staged + header.tile_bytes > quota:
                # Not acknowledged: the device keeps the tile and sends it again after its
                # commit timeout, when stored images may have freed some of its quota.
                detail = f"{device} has {staged} bytes staged, quota {quota}: tile not staged"
                self._note_rejection(ReasonCode.QUOTA_EXCEEDED, detail)
                topic = device_topic(device, DeviceTopic.CHUNK)
                self.outbox.ack(device, ErrorAck(image_id=image_id, topic=topic, detail=detail,
                                                 reason=ReasonCode.QUOTA_EXCEEDED))  # fmt: skip
                return
            assembly = TileAssembly.start(header)
            assembly.add(header)
            self._assemblies[slot] = assembly
        assert assembly is not None
        self.staging.write_chunk(device, image_id, key, header.offset, raw, fresh)
        if len(assembly.ranges) < assembly.chunk_count:
            self._publish_progress(record)
            return
        del self._assemblies[slot]
        if not assembly.complete:
            self._digest_mismatch(device, image_id, key)
            return
        # Verifying and fsyncing a tile takes milliseconds of disk time: do it off the broker's
        # thread so the chunks of other tiles keep flowing meanwhile.
        self._sealing[slot] = self._sealer.submit(self._seal, device, record, key, assembly)

    def _seal(self, device: str, record: ImageRecord, key: TileKey, assembly: TileAssembly) -> None:
        image_id = record.image_id
        try:
            sealed: bool | None = self.staging.seal(device, image_id, key, assembly.digest)
        except TransientError as exc:
            sealed = None
            self.stats.last_error = f"tile {tuple(key)} of {image_id} not staged: {exc}"
            log.error(self.stats.last_error)
        with self._lock:
            self._sealing.pop((image_id, key), None)
            if sealed is None:  # e.g. disk full: no ack, the device sends the tile again later
                self.staging.discard(device, image_id, key)
                return
            if not sealed:
                self._digest_mismatch(device, image_id, key)
                return
            self.ledger.add_tile(image_id, key, assembly.digest, assembly.tile_bytes)
            self._staged_tiles(image_id)[key] = assembly.digest
            self.stats.tiles_committed += 1
            self._tile_ack(device, image_id, key, TileState.COMMITTED)
            self.storer.tile_ready(image_id, key)
            self._maybe_store(record)
            self._publish_progress(record)

    def _digest_mismatch(self, device: str, image_id: UUID, key: TileKey) -> None:
        self.staging.discard(device, image_id, key)
        self._tile_ack(device, image_id, key, TileState.RETRANSMIT, ReasonCode.DIGEST_MISMATCH,
                       "the reassembled tile does not match its digest")  # fmt: skip

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every complete tile is sealed and answered (tests, shutdown)."""
        with self._lock:
            pending = list(self._sealing.values())
        wait(pending, timeout=timeout)

    def close(self) -> None:
        self._sealer.shutdown(wait=True)

    def _staged_bytes(self, device: str) -> int:
        """Bytes `device` holds in staging: tiles of images not yet stored, and reassemblies."""
        total = sum(a.tile_bytes for (i, _), a in self._assemblies.items()
                    if self._device_of(i) == device)  # fmt: skip
        for image_id, _ in self._sealing:  # complete, being verified: on disk all the same
            record = self._records.get(image_id)
            if record is not None and record.device == device and record.manifest is not None:
                total += record.manifest.tile_bytes
        for record in list(self._records.values()):
            if record.device == device and record.manifest is not None and record.phase in (
                Phase.RECEIVING, Phase.STORING, Phase.FAILED
            ):  # fmt: skip
                total += len(self._staged_tiles(record.image_id)) * record.manifest.tile_bytes
        return total

    def _partials(self, device: str) -> int:
        return sum(1 for (image_id, _) in self._assemblies if self._device_of(image_id) == device)

    def _device_of(self, image_id: UUID) -> str | None:
        record = self._records.get(image_id)
        return record.device if record else None

    # -- close ------------------------------------------------------------------------------

    def _close(self, device: str, payload: bytes) -> None:
        close = _decoded(decode_close, payload)
        record = self._record(close.image_id)
        topic = device_topic(device, DeviceTopic.CLOSE)
        if record is None or record.manifest is None:
            reason = ReasonCode.UNKNOWN_IMAGE if record is None else ReasonCode.INVALID_MANIFEST
            self.outbox.ack(device, ErrorAck(image_id=close.image_id, reason=reason,
                                             detail="close for an image without an accepted open",
                                             topic=topic))  # fmt: skip
            return
        if record.device != device:
            raise ProtocolError(ReasonCode.CONFLICT, "the image belongs to another device")
        if record.phase is Phase.COMPLETE:
            self._image_ack(record)
            return
        if record.phase is Phase.FAILED:
            if record.close is None:
                self.ledger.set_close(close.image_id, close)
                record.close = close
            if self._all_in(record):
                self._image_ack(record)
            return
        expected = set(record.manifest.tile_keys())
        if (
            close.tile_count != record.manifest.tile_count
            or {d.tile for d in close.digests} != expected
        ):
            raise ProtocolError(
                ReasonCode.INVALID_MANIFEST, "close lists other tiles than open declared"
            )
        if record.close is None:
            self.ledger.set_close(close.image_id, close)
            record.close = close
        mismatched = self._mismatched(close)
        if mismatched:
            self._fail(
                record,
                ReasonCode.CONFLICT,
                f"{len(mismatched)} staged tiles differ from the close digests",
            )
            return
        self._maybe_store(record)

    def _mismatched(self, close: CloseManifest) -> list[TileKey]:
        staged = self._staged_tiles(close.image_id)
        return [
            d.tile for d in close.digests if d.tile in staged and staged[d.tile].hex() != d.digest
        ]

    # -- storing ----------------------------------------------------------------------------

    def _maybe_store(self, record: ImageRecord) -> None:
        if record.phase is Phase.FAILED and self._all_in(record):
            self._image_ack(record)  # the last tile of a failed image: now the device may let go
            return
        if record.phase is not Phase.RECEIVING or record.close is None or record.manifest is None:
            return
        if len(self._staged_tiles(record.image_id)) < record.manifest.tile_count:
            return
        self.ledger.set_phase(record.image_id, Phase.STORING)
        record.phase = Phase.STORING
        self._publish_progress(record, force=True)
        self.storer.finish(record.image_id)

    def stored(self, image_id: UUID, locations: dict[str, str]) -> None:
        """Called by the storer when every backend holds the image."""
        with self._lock:
            self.ledger.set_phase(image_id, Phase.COMPLETE, locations=locations)
            record = self._reload(image_id)
            if record is None or record.manifest is None:
                return
            progress = self._progress.setdefault(image_id, ImageProgress())
            progress.stored = record.manifest.tile_count
            self._staged.pop(image_id, None)
            log.info("image %s complete: %s", image_id, locations)
            self._image_ack(record)
            self._publish_progress(record, force=True)
            # Done: the ledger answers for it from now on, so a long-running ingest does not
            # keep every image it ever received in memory.
            self._records.pop(image_id, None)
            self._progress.pop(image_id, None)

    def store_failed(self, image_id: UUID, reason: ReasonCode, detail: str) -> None:
        with self._lock:
            record = self._record(image_id)
            if record is not None:
                self._fail(record, reason, detail)

    def store_delayed(self, image_id: UUID, detail: str) -> None:
        """A backend is unreachable; the storer retries. Say so on the image's status."""
        with self._lock:
            self.stats.last_error = f"image {image_id}: {detail}"
            record = self._record(image_id)
            if record is not None:
                record.error = detail
                self._publish_progress(record, force=True)

    def _fail(self, record: ImageRecord, reason: ReasonCode, detail: str) -> None:
        error = f"{reason.value}: {detail}"
        self.ledger.set_phase(record.image_id, Phase.FAILED, error=error)
        record.phase, record.error = Phase.FAILED, error
        self.stats.last_error = f"image {record.image_id}: {error}"
        log.error("image %s failed (its tiles stay staged): %s", record.image_id, error)
        if self._all_in(record):
            self._image_ack(record)
        self._publish_progress(record, force=True)

    def _all_in(self, record: ImageRecord) -> bool:
        """Close received and every tile staged: only then may the device forget the image.

        A backend can fail an image while tiles still arrive; telling the device then would
        make it drop tiles that are not on the server yet.
        """
        if record.close is None or record.manifest is None:
            return False
        return len(self._staged_tiles(record.image_id)) >= record.manifest.tile_count

    def recover(self) -> list[UUID]:
        """At start-up: resume images that were being stored or became complete while down."""
        dropped = self.staging.drop_partials()
        if dropped:
            log.info(
                "dropped %d partial tiles from before the restart; devices resend them", dropped
            )
        resumed = []
        with self._lock:
            for record in self.ledger.images(Phase.STORING):
                self._records[record.image_id] = record
                self.storer.finish(record.image_id)
                resumed.append(record.image_id)
            for record in self.ledger.images(Phase.RECEIVING):
                self._records[record.image_id] = record
                self.storer.begin(record.image_id)
                self._maybe_store(record)
            for record in self.ledger.images(Phase.FAILED):  # their staged tiles count to quota
                self._records[record.image_id] = record
        return resumed

    # -- helpers ----------------------------------------------------------------------------

    def _record(self, image_id: UUID) -> ImageRecord | None:
        record = self._records.get(image_id)
        if record is None:
            record = self.ledger.image(image_id)
            if record is not None:
                self._records[image_id] = record
        return record

    def _reload(self, image_id: UUID) -> ImageRecord | None:
        self._records.pop(image_id, None)
        return self._record(image_id)

    def _staged_tiles(self, image_id: UUID) -> dict[TileKey, bytes]:
        staged = self._staged.get(image_id)
        if staged is None:
            staged = self._staged[image_id] = self.ledger.tiles(image_id)
        return staged

    def _tile_ack(self, device: str, image_id: UUID, key: TileKey, state: TileState,
                  reason: ReasonCode | None = None, detail: str | None = None) -> None:  # fmt: skip
        self.outbox.ack(
            device, TileAck(image_id=image_id, tile=key, state=state, reason=reason, detail=detail)
        )

    def _image_ack(self, record: ImageRecord) -> None:
        state = ImageState.COMPLETE if record.phase is Phase.COMPLETE else ImageState.FAILED
        reason = None
        if record.phase is not Phase.COMPLETE and record.error:
            code = record.error.split(":", 1)[0]
            reason = (
                ReasonCode(code)
                if code in ReasonCode._value2member_map_
                else ReasonCode.STORAGE_FAILED
            )
        detail = _clip(record.error) if reason and record.error else None
        self.outbox.ack(record.device, ImageAck(image_id=record.image_id, state=state,
                                                locations=record.locations, reason=reason,
                                                detail=detail))  # fmt: skip

    def _publish_progress(self, record: ImageRecord, force: bool = False) -> None:
        progress = self._progress.setdefault(record.image_id, ImageProgress())
        now = time.monotonic()
        if not force and now - progress.last_published < 0.5:
            return
        progress.committed = (
            len(self._staged_tiles(record.image_id))
            if record.phase is not Phase.COMPLETE
            else (record.manifest.tile_count if record.manifest else 0)
        )
        progress.partial = sum(1 for (i, _) in self._assemblies if i == record.image_id)
        progress.last_published = now
        self.outbox.image_changed(record, progress)

    def _note_rejection(self, reason: ReasonCode, detail: str) -> None:
        detail = _clip(detail)
        self.stats.rejections[reason.value] += 1
        self.stats.last_error = detail
        log.warning("refused %s", detail)

    def images_in_progress(self) -> int:
        with self._lock:
            return sum(
                1 for r in self._records.values() if r.phase in (Phase.RECEIVING, Phase.STORING)
            )


def _refused_before(record: ImageRecord, device: str) -> bool:
    return record.phase is Phase.REJECTED and record.manifest is None and record.device == device


def _peek_image_id(payload: bytes) -> UUID | None:
    try:
        return UUID(str(json.loads(payload)["image_id"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return None


M = TypeVar("M")

MAX_DETAIL = 900
"""Reasons quote the input; keep them (with any prefix) within an ack's 1024-char `detail`."""


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else f"{text[: MAX_DETAIL - 3]}..."


def _decoded(decode: Callable[[bytes], M], payload: bytes) -> M:
    """`decode`, with JSON nested too deeply for Python's parser refused as malformed."""
    try:
        return decode(payload)
    except RecursionError:
        raise ProtocolError(ReasonCode.MALFORMED, "JSON nested too deeply") from None

"""Device messages and staging results, turned into lifecycle events, staging jobs and
answers. Runs on the core thread only (see core.py); owns no thread, does no I/O.

Every refusal is decided here before any work: geometry and quotas before a chunk is
placed, the manifest budget before an open is parsed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TypeVar
from uuid import UUID

from server_ingest.assembler import Added, TileAssembly
from server_ingest.events import ChunkWritten, Inbound, Seal, TileRef, TileSealed
from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import Closed, Image, Opened, OpenRefused, Staged, clip
from server_ingest.limits import check_admission, check_chunk, check_manifest, image_bytes
from server_ingest.ports import Driver
from server_ingest.settings import Limits
from server_ingest.stager import SealTile, WriteChunk
from server_ingest.state import CoreState, ImageBook
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.framing import ChunkHeader, decode_chunk, peek_identity
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    ErrorAck,
    TileAck,
    TileState,
    decode_close,
    decode_open,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_protocol.topics import DeviceTopic, device_topic

log = logging.getLogger(__name__)

Located = tuple[ImageBook | None, Image | None]
"""The image's book (if the core holds its tiles) and its lifecycle state (None: unknown)."""


class Intake:
    def __init__(self, state: CoreState, driver: Driver, limits: Limits) -> None:
        self.state = state
        self.driver = driver
        self.limits = limits
        self._generation = 0

    def message(self, device: str, kind: DeviceTopic, message: Inbound) -> None:
        if kind is DeviceTopic.CHUNK:
            self._chunk(device, message)
        elif kind is DeviceTopic.OPEN:
            self._open(device, message)
        elif kind is DeviceTopic.CLOSE:
            self._close(device, message)
        else:
            raise ProtocolError(ReasonCode.MALFORMED, f"{kind.value} is not sent to the ingest")

    def _locate(self, key: ImageKey, message: Inbound) -> Located | None:
        """The image as held in memory, or None while the ledger is asked about it."""
        book = self.state.images.get(key)
        if book is not None:
            return book, book.image
        image = self.state.finished.get(key)
        if image is not None:
            return None, image
        if key in self.state.absent:
            return None, None
        return None if self.driver.park(key, message) else (None, None)

    # -- open -------------------------------------------------------------------------------

    def _open(self, device: str, message: Inbound) -> None:
        payload, state, limits = message.payload, self.state, self.limits
        held = state.manifest_bytes(device)
        if held + len(payload) > limits.max_manifest_bytes_per_device:
            self.driver.refuse(device, ReasonCode.QUOTA_EXCEEDED, "manifests")
            detail = (
                f"{device} holds {held} bytes of manifests, the limit is "
                f"{limits.max_manifest_bytes_per_device}: open refused for now"
            )
            self.driver.send(
                device, _error(device, DeviceTopic.OPEN, ReasonCode.QUOTA_EXCEEDED, detail, None)
            )
            return
        try:
            manifest = _decoded(decode_open, payload)
            problem = check_manifest(limits, manifest)
            if problem is not None:
                raise problem
        except ProtocolError as exc:
            image_id = _peek_image_id(payload)
            if image_id is None:
                raise
            self.driver.refuse(device, exc.reason, f"open of {image_id}: {exc.detail}")
            key = ImageKey(device, image_id)
            if self._locate(key, message) is not None:
                self.driver.apply(key, OpenRefused(self.driver.now(), exc.reason, exc.detail))
            return
        key = ImageKey(device, manifest.image_id)
        located = self._locate(key, message)
        if located is None:
            return
        _, image = located
        if image is None or image.phase in (Phase.REJECTED, Phase.EXPIRED):  # would start
            receiving = state.receiving(device)
            refusal = check_admission(
                limits,
                len(receiving),
                sum(image_bytes(b.manifest) for b in receiving),
                held,
                manifest,
                len(payload),
            )
            if refusal is not None:
                self.driver.refuse(device, ReasonCode.QUOTA_EXCEEDED, refusal)
                self.driver.send(
                    device,
                    _error(
                        device, DeviceTopic.OPEN, ReasonCode.QUOTA_EXCEEDED, refusal, key.image_id
                    ),
                )
                return
        self.driver.apply(key, Opened(self.driver.now(), manifest), manifest_size=len(payload))

    # -- chunks -----------------------------------------------------------------------------

    def _chunk(self, device: str, message: Inbound) -> None:
        try:
            header, raw = decode_chunk(message.payload, self.limits.max_chunk_bytes)
        except ProtocolError as exc:
            ident = peek_identity(message.payload)
            if ident is None:
                raise
            state = (
                TileState.RETRANSMIT
                if exc.reason is ReasonCode.BAD_CHECKSUM
                else (TileState.REJECTED)
            )
            self._tile_refusal(device, ident[0], ident[1], state, exc.reason, exc.detail)
            return
        key, tile = ImageKey(device, header.image_id), header.tile
        located = self._locate(key, message)
        if located is None:
            return
        book, image = located
        if image is None or image.phase is Phase.EXPIRED:
            self._tile_refusal(
                device,
                key.image_id,
                tile,
                TileState.RETRANSMIT,
                ReasonCode.UNKNOWN_IMAGE,
                "no open manifest for this image: send open, then the tile",
            )
        elif image.phase is Phase.COMPLETE:
            if header.chunk_index == header.chunk_count - 1:  # a resend: ack again
                self.driver.after_durable(device, _committed(key, tile))
        elif image.phase is Phase.REJECTED:
            self._tile_refusal(
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                ReasonCode.INVALID_MANIFEST,
                f"the image was refused: {image.reason}: {image.detail}",
            )
        elif image.phase is Phase.DISCARDED or book is None:
            self._tile_refusal(
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                ReasonCode.NOT_PERMITTED,
                image.detail or "discarded",
            )
        else:
            self._place(book, header, raw)

    def _place(self, book: ImageBook, header: ChunkHeader, raw: bytes) -> None:
        key, tile, m = book.image.key, header.tile, book.manifest
        device = key.device
        problem = (
            None
            if m.has_tile(tile)
            else ProtocolError(
                ReasonCode.OUT_OF_RANGE, f"tile {tuple(tile)} is not in the manifest"
            )
        )
        problem = problem or check_chunk(self.limits, header, m.tile_bytes)
        if problem is not None:
            self._tile_refusal(
                device, key.image_id, tile, TileState.REJECTED, problem.reason, problem.detail
            )
            return
        staged = book.staged.get(tile)
        if staged is not None:
            if staged != header.tile_digest:
                self._tile_refusal(
                    device,
                    key.image_id,
                    tile,
                    TileState.REJECTED,
                    ReasonCode.CONFLICT,
                    "this tile was already committed with other content",
                )
            elif header.chunk_index == header.chunk_count - 1:
                self.driver.after_durable(device, _committed(key, tile))
            return
        expected = book.close_digest(tile)
        if expected is not None and expected != header.tile_digest:
            self._tile_refusal(
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                ReasonCode.CONFLICT,
                "the tile differs from its digest in the close manifest",
            )
            return
        if tile in book.sealing:
            return  # a resend racing the seal of the same tile: its commit ack is on the way
        assembly = book.assemblies.get(tile)
        fresh = assembly is None
        if assembly is not None:
            added = assembly.add(header)
            if added is Added.DUPLICATE:
                return
            if added is Added.CONFLICT:
                # e.g. the device restarted with another chunk size: start this tile over.
                log.info("tile %s of %s restarted by a conflicting chunk", tuple(tile), key)
                del book.assemblies[tile]
                fresh = True
        if fresh:
            refusal = self._room_for_a_tile(device, m.tile_bytes)
            if refusal is not None:
                self.driver.refuse(device, ReasonCode.QUOTA_EXCEEDED, refusal)
                self.driver.send(
                    device,
                    _error(
                        device, DeviceTopic.CHUNK, ReasonCode.QUOTA_EXCEEDED, refusal, key.image_id
                    ),
                )
                return
            self._generation += 1
            assembly = TileAssembly.start(header, self._generation)
            if assembly.add(header) is not Added.NEW:
                self._tile_refusal(
                    device,
                    key.image_id,
                    tile,
                    TileState.REJECTED,
                    ReasonCode.OUT_OF_RANGE,
                    "the chunk lies outside its tile",
                )
                return
            book.assemblies[tile] = assembly
        assert assembly is not None
        ref = TileRef(key, tile, assembly.generation)
        self.driver.stage(WriteChunk(ref, header.chunk_index, header.offset, raw, fresh))
        self.driver.publish(key, False)

    def _room_for_a_tile(self, device: str, tile_bytes: int) -> str | None:
        partial = self.state.partial_tiles(device)
        if partial >= self.limits.max_partial_tiles_per_device:
            return (
                f"{device} has {partial} tiles in reassembly, the limit is "
                f"{self.limits.max_partial_tiles_per_device}: tile not staged now"
            )
        staged, quota = self.state.staged_bytes(device), self.limits.max_staged_bytes_per_device
        if staged + tile_bytes > quota:
            return f"{device} has {staged} bytes staged, quota {quota}: tile not staged now"
        return None

    def written(self, event: ChunkWritten) -> None:
        book, assembly = self._assembly(event.ref, sealing=False)
        if book is None or assembly is None:
            return
        tile = event.ref.tile
        if event.error is not None:
            assembly.failed(event.chunk_index)  # its resend must be taken (issue 12, cause 2)
            if not assembly.ranges:
                del book.assemblies[tile]
            self._unavailable(
                book.image.key, f"tile {tuple(tile)} of {book.image.key} not staged: {event.error}"
            )
            return
        assembly.written(event.chunk_index)
        if assembly.all_arrived:
            del book.assemblies[tile]
            book.sealing[tile] = assembly
            self.driver.stage(SealTile(event.ref, assembly.digest, assembly.tile_bytes))

    def sealed(self, event: TileSealed) -> None:
        book, assembly = self._assembly(event.ref, sealing=True)
        if book is None or assembly is None:
            return
        key, tile = event.ref.key, event.ref.tile
        del book.sealing[tile]
        if event.outcome is Seal.MISMATCH:
            self._tile_refusal(
                key.device,
                key.image_id,
                tile,
                TileState.RETRANSMIT,
                ReasonCode.DIGEST_MISMATCH,
                "the reassembled tile does not match its digest",
            )
        elif event.outcome is Seal.FAILED:
            self._unavailable(key, f"tile {tuple(tile)} of {key} not staged: {event.detail}")
        elif book.image.phase in (Phase.RECEIVING, Phase.FAILED) and tile not in book.staged:
            book.staged[tile] = assembly.digest
            self.state.stats.tiles_committed += 1
            self.driver.apply(
                key, Staged(self.driver.now(), tile, assembly.digest, assembly.tile_bytes)
            )

    def _assembly(
        self, ref: TileRef, sealing: bool
    ) -> tuple[ImageBook | None, TileAssembly | None]:
        book = self.state.images.get(ref.key)
        if book is None:
            return None, None
        assembly = (book.sealing if sealing else book.assemblies).get(ref.tile)
        if assembly is None or assembly.generation != ref.generation:
            return book, None  # a stale result of a reassembly that was restarted
        return book, assembly

    def _unavailable(self, key: ImageKey, detail: str) -> None:
        """Not staged now (e.g. the disk is full): no ack, the device resends after its
        timeout. It is told why once a second, never asked to resend at once."""
        self.state.stats.last_error = detail
        log.error(detail)
        device = self.state.device(key.device)
        if device.should_tell(ReasonCode.UNAVAILABLE, self.driver.now()):
            self.driver.refuse(key.device, ReasonCode.UNAVAILABLE, detail)
            self.driver.send(
                key.device,
                _error(key.device, DeviceTopic.CHUNK, ReasonCode.UNAVAILABLE, detail, key.image_id),
            )

    # -- close ------------------------------------------------------------------------------

    def _close(self, device: str, message: Inbound) -> None:
        close = _decoded(decode_close, message.payload)
        key = ImageKey(device, close.image_id)
        located = self._locate(key, message)
        if located is None:
            return
        book, _ = located
        conflicts = 0
        if book is not None and book.image.phase in (Phase.RECEIVING, Phase.FAILED):
            m = book.manifest
            if close.tile_count != m.tile_count or {d.tile for d in close.digests} != set(
                m.tile_keys()
            ):
                raise ProtocolError(
                    ReasonCode.INVALID_MANIFEST, "close lists other tiles than open declared"
                )
            staged = book.staged
            conflicts = len(
                [d for d in close.digests if d.tile in staged and staged[d.tile].hex() != d.digest]
            )
            if book.close is None:
                book.close = close
        self.driver.apply(key, Closed(self.driver.now(), close, conflicts))

    def _tile_refusal(
        self,
        device: str,
        image_id: UUID,
        tile: TileKey,
        state: TileState,
        reason: ReasonCode,
        detail: str,
    ) -> None:
        self.driver.refuse(device, reason, f"chunk of {image_id} {tuple(tile)}: {detail}")
        self.driver.send(
            device,
            TileAck(image_id=image_id, tile=tile, state=state, reason=reason, detail=_clip(detail)),
        )


def _committed(key: ImageKey, tile: TileKey) -> TileAck:
    return TileAck(image_id=key.image_id, tile=tile, state=TileState.COMMITTED)


def _error(
    device: str, kind: DeviceTopic, reason: ReasonCode, detail: str, image_id: UUID | None
) -> ErrorAck:
    return ErrorAck(
        image_id=image_id,
        reason=reason,
        detail=_clip(detail) or "",
        topic=device_topic(device, kind),
    )


def _peek_image_id(payload: bytes) -> UUID | None:
    try:
        return UUID(str(json.loads(payload)["image_id"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return None


M = TypeVar("M")
_clip = clip


def _decoded(decode: Callable[[bytes], M], payload: bytes) -> M:
    """`decode`, with JSON nested too deeply for Python's parser refused as malformed."""
    try:
        return decode(payload)
    except RecursionError:
        raise ProtocolError(ReasonCode.MALFORMED, "JSON nested too deeply") from None

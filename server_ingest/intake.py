"""Device messages and staging results, turned into lifecycle events, staging jobs and
answers. Runs on the core thread only (see core.py); owns no thread, does no I/O.

Every refusal is decided here before any work: geometry and quotas before a chunk is
placed, the manifest budget before an open is parsed.
"""

from __future__ import annotations

import logging

from server_ingest.answers import committed, decoded, error_ack, peek_image_id, tile_refusal
from server_ingest.events import Inbound
from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import Closed, Image, Opened, OpenRefused
from server_ingest.limits import check_admission, check_manifest, image_bytes
from server_ingest.ports import Driver
from server_ingest.retention import NONE
from server_ingest.settings import Limits
from server_ingest.state import CoreState, ImageBook
from server_ingest.tiles import TileIntake
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.framing import decode_chunk, peek_identity
from tilebridge_protocol.messages import (
    CloseManifest,
    TileState,
    decode_close,
    decode_open,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_protocol.topics import DeviceTopic

log = logging.getLogger(__name__)

Located = tuple[ImageBook | None, Image | None]
"""The image's book (if the core holds its tiles) and its lifecycle state (None: unknown)."""


class Intake:
    def __init__(self, state: CoreState, driver: Driver, limits: Limits) -> None:
        self.state = state
        self.driver = driver
        self.limits = limits
        self.tiles = TileIntake(state, driver, limits)

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
                device, error_ack(device, DeviceTopic.OPEN, ReasonCode.QUOTA_EXCEEDED, detail, None)
            )
            return
        try:
            manifest = decoded(decode_open, payload)
            problem = check_manifest(limits, manifest)
            if problem is not None:
                raise problem
        except ProtocolError as exc:
            image_id = peek_image_id(payload)
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
            if state.stats.disk_pressure != NONE:
                detail = (
                    f"the staging disk is low ({state.stats.staging_free_bytes} bytes free): "
                    "new images wait, send the open again later"
                )
                self.driver.refuse(device, ReasonCode.UNAVAILABLE, detail)
                self.driver.send(
                    device,
                    error_ack(
                        device, DeviceTopic.OPEN, ReasonCode.UNAVAILABLE, detail, key.image_id
                    ),
                )
                return
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
                    error_ack(
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
            tile_refusal(self.driver, device, ident[0], ident[1], state, exc.reason, exc.detail)
            return
        key, tile = ImageKey(device, header.image_id), header.tile
        located = self._locate(key, message)
        if located is None:
            return
        book, image = located
        if image is None or image.phase is Phase.EXPIRED:
            tile_refusal(
                self.driver,
                device,
                key.image_id,
                tile,
                TileState.RETRANSMIT,
                ReasonCode.UNKNOWN_IMAGE,
                "no open manifest for this image: send open, then the tile",
            )
        elif image.phase is Phase.COMPLETE:
            if header.chunk_index == header.chunk_count - 1:  # a resend: ack again
                self.driver.after_durable(device, committed(key, tile))
        elif image.phase is Phase.REJECTED:
            tile_refusal(
                self.driver,
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                ReasonCode.INVALID_MANIFEST,
                f"the image was refused: {image.reason}: {image.detail}",
            )
        elif image.phase is Phase.DISCARDED or book is None:
            tile_refusal(
                self.driver,
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                ReasonCode.NOT_PERMITTED,
                image.detail or "discarded",
            )
        else:
            self.tiles.place(book, header, raw)

    def _close(self, device: str, message: Inbound) -> None:
        close = decoded(decode_close, message.payload)
        key = ImageKey(device, close.image_id)
        located = self._locate(key, message)
        if located is None:
            return
        book, _ = located
        conflicts, committed = 0, None
        if book is not None and book.image.phase in (Phase.RECEIVING, Phase.FAILED):
            problem = close.check(book.manifest)
            if problem is not None:
                raise ProtocolError(ReasonCode.INVALID_MANIFEST, problem)
            staged = book.staged
            conflicts = len(
                [d for d in close.digests if d.tile in staged and staged[d.tile].hex() != d.digest]
            )
            if book.close is None:
                committed = self._hold_only(book, close)
                book.close = close
        self.driver.apply(key, Closed(self.driver.now(), close, conflicts, committed))

    def _hold_only(self, book: ImageBook, close: CloseManifest) -> int:
        """The first close says what the image holds: staged tiles (and tiles being
        reassembled) it leaves out were sent, then left out; they are dropped, never stored.
        Returns how many of the listed tiles are staged."""
        listed = {d.tile for d in close.digests}
        dropped = {k for k in (*book.staged, *book.assemblies) if k not in listed}
        for tile in dropped:
            book.staged.pop(tile, None)
            book.assemblies.pop(tile, None)
        if dropped:
            log.warning(
                "image %s: its close leaves out %d tiles that were sent; they are dropped",
                book.image.key, len(dropped),
            )  # fmt: skip
        return len(book.staged)

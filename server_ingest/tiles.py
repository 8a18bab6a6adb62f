"""Chunks placed into tile reassemblies, and what staging answers about them: runs on the
core thread only (see core.py), does no I/O. A chunk is checked against the tile (geometry,
the staged and the closed digests) and the device's room (partial tiles, staged bytes) before
it is placed; a tile is committed to the lifecycle only once staging has sealed it."""

from __future__ import annotations

import logging

from server_ingest.answers import committed, error_ack, tile_refusal
from server_ingest.assembler import Added, TileAssembly
from server_ingest.events import ChunkWritten, Seal, TileRef, TileSealed
from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import Staged
from server_ingest.limits import check_chunk
from server_ingest.ports import Driver
from server_ingest.retention import TILES_REFUSED
from server_ingest.settings import Limits
from server_ingest.stager import SealTile, WriteChunk
from server_ingest.state import CoreState, ImageBook
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.framing import ChunkHeader
from tilebridge_protocol.messages import (
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_protocol.topics import DeviceTopic

log = logging.getLogger(__name__)


class TileIntake:
    def __init__(self, state: CoreState, driver: Driver, limits: Limits) -> None:
        self.state = state
        self.driver = driver
        self.limits = limits
        self._generation = 0

    def place(self, book: ImageBook, header: ChunkHeader, raw: bytes) -> None:
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
            tile_refusal(
                self.driver,
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                problem.reason,
                problem.detail,
            )
            return
        staged = book.staged.get(tile)
        if staged is not None:
            if staged != header.tile_digest:
                tile_refusal(
                    self.driver,
                    device,
                    key.image_id,
                    tile,
                    TileState.REJECTED,
                    ReasonCode.CONFLICT,
                    "this tile was already committed with other content",
                )
            elif header.chunk_index == header.chunk_count - 1:
                self.driver.after_durable(device, committed(key, tile))
            return
        expected = book.close_digest(tile)
        if book.close is not None and expected is None:
            tile_refusal(
                self.driver,
                device,
                key.image_id,
                tile,
                TileState.REJECTED,
                ReasonCode.OUT_OF_RANGE,
                "the image's close does not list this tile: it is not part of the image",
            )
            return
        if expected is not None and expected != header.tile_digest:
            tile_refusal(
                self.driver,
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
        if fresh and self.state.stats.disk_pressure == TILES_REFUSED:
            free = self.state.stats.staging_free_bytes
            self._unavailable(key, f"the staging disk is low ({free} bytes free): tiles wait")
            return
        if fresh:
            refusal = self._room_for_a_tile(device, m.tile_bytes)
            if refusal is not None:
                self.driver.refuse(device, ReasonCode.QUOTA_EXCEEDED, refusal)
                self.driver.send(
                    device,
                    error_ack(
                        device, DeviceTopic.CHUNK, ReasonCode.QUOTA_EXCEEDED, refusal, key.image_id
                    ),
                )
                return
            self._generation += 1
            assembly = TileAssembly.start(header, self._generation)
            if assembly.add(header) is not Added.NEW:
                tile_refusal(
                    self.driver,
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
            tile_refusal(
                self.driver,
                key.device,
                key.image_id,
                tile,
                TileState.RETRANSMIT,
                ReasonCode.DIGEST_MISMATCH,
                "the reassembled tile does not match its digest",
            )
        elif event.outcome is Seal.FAILED:
            self._unavailable(key, f"tile {tuple(tile)} of {key} not staged: {event.detail}")
        elif book.close is not None and book.close_digest(tile) is None:
            log.info("tile %s of %s sealed after a close that leaves it out: dropped", tile, key)
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
                error_ack(
                    key.device, DeviceTopic.CHUNK, ReasonCode.UNAVAILABLE, detail, key.image_id
                ),
            )

    # -- close ------------------------------------------------------------------------------

"""Which chunks of a tile have arrived, and which are on disk: pure bookkeeping, no I/O.

Chunks may come in any order, twice, or from two sends of the same tile. A chunk is first
*reserved* (`add`: its bytes are being written) and then *written* (`written`) or released
again (`failed`: the write did not happen, so a resend must be taken, not dropped as a
duplicate). A tile is complete when written ranges cover it exactly once. A chunk that
disagrees with what the first chunk said about the tile (size, chunk count, digest) is a
conflict, never silently merged.

Ranges are kept sorted by offset, so placing a chunk costs O(log n) comparisons whatever
arrives: a flood of tiny or empty chunks cannot make the check quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from sortedcontainers import SortedDict

from tilebridge_protocol.framing import ChunkHeader


class Added(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass
class TileAssembly:
    tile_bytes: int
    chunk_count: int
    digest: bytes
    generation: int = 0
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    """chunk index -> (offset, length), reserved or written"""
    covered: int = 0
    """Bytes written."""
    _by_offset: SortedDict = field(default_factory=SortedDict)
    _written: set[int] = field(default_factory=set)

    @classmethod
    def start(cls, header: ChunkHeader, generation: int = 0) -> TileAssembly:
        return cls(header.tile_bytes, header.chunk_count, header.tile_digest, generation)

    def add(self, header: ChunkHeader) -> Added:
        if (
            header.tile_bytes != self.tile_bytes
            or header.chunk_count != self.chunk_count
            or header.tile_digest != self.digest
        ):
            return Added.CONFLICT
        offset, length = header.offset, header.raw_length
        known = self.ranges.get(header.chunk_index)
        if known is not None:
            return Added.DUPLICATE if known == (offset, length) else Added.CONFLICT
        if length == 0 and self.tile_bytes > 0:
            return Added.CONFLICT  # only an empty tile has an empty chunk
        if self._overlaps(offset, offset + length):
            return Added.CONFLICT
        self.ranges[header.chunk_index] = (offset, length)
        self._by_offset[offset] = header.chunk_index
        return Added.NEW

    def _overlaps(self, start: int, end: int) -> bool:
        spans = self._by_offset
        at = spans.bisect_left(start)
        if at < len(spans):  # the first range starting at or after `start`
            other_start = spans.peekitem(at)[0]
            if other_start < end or other_start == start:
                return True
        if at > 0:  # the last range starting before `start`
            index = spans.peekitem(at - 1)[1]
            other_start, other_length = self.ranges[index]
            if other_start + other_length > start:
                return True
        return False

    def written(self, chunk_index: int) -> None:
        if chunk_index in self.ranges and chunk_index not in self._written:
            self._written.add(chunk_index)
            self.covered += self.ranges[chunk_index][1]

    def failed(self, chunk_index: int) -> None:
        """The chunk did not reach the disk: forget it, so its resend is taken."""
        span = self.ranges.pop(chunk_index, None)
        if span is None:
            return
        del self._by_offset[span[0]]
        if chunk_index in self._written:
            self._written.discard(chunk_index)
            self.covered -= span[1]

    @property
    def pending(self) -> int:
        """Chunks reserved and not yet written."""
        return len(self.ranges) - len(self._written)

    @property
    def complete(self) -> bool:
        return len(self._written) == self.chunk_count and self.covered == self.tile_bytes

    @property
    def all_arrived(self) -> bool:
        """Every chunk index is here and written (whether or not it covers the tile)."""
        return len(self._written) == self.chunk_count and not self.pending

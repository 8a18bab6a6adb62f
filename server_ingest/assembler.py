"""Which chunks of a tile have arrived: pure bookkeeping, no I/O.

Chunks may come in any order, twice, or from two sends of the same tile. A tile is complete
when its byte ranges cover it exactly once. A chunk that disagrees with what the first chunk
said about the tile (size, chunk count, digest) is a conflict, never silently merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

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
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    """chunk index -> (offset, length)"""
    covered: int = 0

    @classmethod
    def start(cls, header: ChunkHeader) -> TileAssembly:
        return cls(header.tile_bytes, header.chunk_count, header.tile_digest)

    def add(self, header: ChunkHeader) -> Added:
        if (
            header.tile_bytes != self.tile_bytes
            or header.chunk_count != self.chunk_count
            or header.tile_digest != self.digest
        ):
            return Added.CONFLICT
        span = (header.offset, header.raw_length)
        known = self.ranges.get(header.chunk_index)
        if known is not None:
            return Added.DUPLICATE if known == span else Added.CONFLICT
        end = header.offset + header.raw_length
        for offset, length in self.ranges.values():
            if header.offset < offset + length and offset < end:
                return Added.CONFLICT
        self.ranges[header.chunk_index] = span
        self.covered += header.raw_length
        return Added.NEW

    @property
    def complete(self) -> bool:
        return len(self.ranges) == self.chunk_count and self.covered == self.tile_bytes

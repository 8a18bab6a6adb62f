from __future__ import annotations

from uuid import uuid4

from server_ingest.assembler import Added, TileAssembly
from tilebridge_protocol.framing import ChunkHeader
from tilebridge_protocol.keys import TileKey

IMAGE = uuid4()


def _header(index: int, offset: int, length: int, count: int = 3, total: int = 30) -> ChunkHeader:
    return ChunkHeader(IMAGE, TileKey(0), index, count, offset, total, length, b"d" * 16)


def test_out_of_order_chunks_complete_the_tile() -> None:
    asm = TileAssembly.start(_header(2, 20, 10))
    assert asm.add(_header(2, 20, 10)) is Added.NEW
    assert asm.add(_header(0, 0, 10)) is Added.NEW
    assert not asm.complete
    assert asm.add(_header(1, 10, 10)) is Added.NEW
    assert asm.complete


def test_duplicates_are_recognised() -> None:
    asm = TileAssembly.start(_header(0, 0, 10))
    asm.add(_header(0, 0, 10))
    assert asm.add(_header(0, 0, 10)) is Added.DUPLICATE
    assert asm.covered == 10


def test_disagreeing_chunks_are_conflicts() -> None:
    asm = TileAssembly.start(_header(0, 0, 10))
    asm.add(_header(0, 0, 10))
    assert asm.add(_header(0, 0, 12)) is Added.CONFLICT  # same index, other span
    assert asm.add(_header(1, 5, 10)) is Added.CONFLICT  # overlaps chunk 0
    assert asm.add(_header(1, 10, 10, count=4)) is Added.CONFLICT  # other chunk count
    assert asm.add(_header(1, 10, 10, total=40)) is Added.CONFLICT  # other tile size


def test_all_chunks_but_short_coverage_is_not_complete() -> None:
    asm = TileAssembly.start(_header(0, 0, 5, count=2))
    asm.add(_header(0, 0, 5, count=2))
    asm.add(_header(1, 10, 5, count=2))
    assert len(asm.ranges) == 2
    assert not asm.complete

from __future__ import annotations

from uuid import uuid4

from server_ingest.assembler import Added, TileAssembly
from tilebridge_protocol.framing import ChunkHeader
from tilebridge_protocol.keys import TileKey

IMAGE = uuid4()


def _header(index: int, offset: int, length: int, count: int = 3, total: int = 30) -> ChunkHeader:
    return ChunkHeader(IMAGE, TileKey(0), index, count, offset, total, length, b"d" * 16)


def _place(asm: TileAssembly, header: ChunkHeader) -> Added:
    added = asm.add(header)
    if added is Added.NEW:
        asm.written(header.chunk_index)
    return added


def test_out_of_order_chunks_complete_the_tile() -> None:
    asm = TileAssembly.start(_header(2, 20, 10))
    assert _place(asm, _header(2, 20, 10)) is Added.NEW
    assert _place(asm, _header(0, 0, 10)) is Added.NEW
    assert not asm.complete
    assert _place(asm, _header(1, 10, 10)) is Added.NEW
    assert asm.complete


def test_duplicates_are_recognised() -> None:
    asm = TileAssembly.start(_header(0, 0, 10))
    _place(asm, _header(0, 0, 10))
    assert asm.add(_header(0, 0, 10)) is Added.DUPLICATE
    assert asm.covered == 10


def test_disagreeing_chunks_are_conflicts() -> None:
    asm = TileAssembly.start(_header(0, 0, 10))
    _place(asm, _header(0, 0, 10))
    assert asm.add(_header(0, 0, 12)) is Added.CONFLICT  # same index, other span
    assert asm.add(_header(1, 5, 10)) is Added.CONFLICT  # overlaps chunk 0
    assert asm.add(_header(2, 0, 3)) is Added.CONFLICT  # starts where chunk 0 starts
    assert asm.add(_header(1, 10, 10, count=4)) is Added.CONFLICT  # other chunk count
    assert asm.add(_header(1, 10, 10, total=40)) is Added.CONFLICT  # other tile size
    assert asm.add(_header(2, 25, 10)) is Added.NEW
    assert asm.add(_header(1, 15, 12)) is Added.CONFLICT  # overlaps the range after it


def test_all_chunks_but_short_coverage_is_not_complete() -> None:
    asm = TileAssembly.start(_header(0, 0, 5, count=2))
    _place(asm, _header(0, 0, 5, count=2))
    _place(asm, _header(1, 10, 5, count=2))
    assert len(asm.ranges) == 2
    assert asm.all_arrived and not asm.complete


def test_a_chunk_whose_write_failed_is_taken_again() -> None:
    """Issue 12, cause 2: a single-chunk tile whose write hit a full disk stalled for good,
    because the chunk was recorded before it was written and every resend was a duplicate."""
    asm = TileAssembly.start(_header(0, 0, 30, count=1))
    assert asm.add(_header(0, 0, 30, count=1)) is Added.NEW
    assert asm.pending == 1 and not asm.complete
    asm.failed(0)
    assert asm.pending == 0
    assert asm.add(_header(0, 0, 30, count=1)) is Added.NEW  # the resend, not a duplicate
    asm.written(0)
    assert asm.complete


def test_empty_chunks_of_a_non_empty_tile_are_conflicts() -> None:
    """The zero-length flood: each used to be kept and scanned against all the others."""
    asm = TileAssembly.start(_header(0, 0, 0, count=30_000, total=30))
    refused = [asm.add(_header(i, 0, 0, count=30_000, total=30)) for i in range(30_000)]
    assert set(refused) == {Added.CONFLICT}
    assert not asm.ranges


def test_many_chunks_each_placed_against_its_neighbours() -> None:
    total, count = 200_000, 100_000
    asm = TileAssembly.start(_header(0, 0, 2, count=count, total=total))
    order = [*range(0, count, 2), *range(1, count, 2)]  # every other, then the gaps
    assert all(_place(asm, _header(i, 2 * i, 2, count, total)) is Added.NEW for i in order)
    assert asm.complete


def test_an_empty_tile_has_one_empty_chunk() -> None:
    asm = TileAssembly.start(_header(0, 0, 0, count=1, total=0))
    assert _place(asm, _header(0, 0, 0, count=1, total=0)) is Added.NEW
    assert asm.complete

"""One device identity in an attacker's hands, against a real Mosquitto with the production
ACL and the real `server-ingest`: every attack is refused with its reason code, the ingest
stays online and within `RSS_BOUND`, writes nothing outside its data directory, and a
well-behaved device's scan completes within `SCAN_BOUND_S` (bounds in _ingest_fixtures)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from uuid import UUID, uuid4

import zstandard

from devtools.stack import wait_for
from tests.hostile._ingest_fixtures import GOOD, HOSTILE, SCAN, Site, ingest_site  # noqa: F401
from tilebridge_protocol.framing import ChunkHeader, Codec, encode_chunk, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.topics import DeviceTopic
from tilebridge_storage.testing.manifests import make_manifest

MiB = 1024 * 1024


def poison_chunk(image_id: UUID | None = None) -> bytes:
    """A correctly checksummed chunk whose zstd frame declares 1 TiB of content."""
    frame = (
        b"\x28\xb5\x2f\xfd\xe0"
        + struct.pack("<Q", 1 << 40)
        + (1 | (1 << 1) | ((128 * 1024) << 3)).to_bytes(3, "little")
        + b"\x00"
    )
    header = ChunkHeader(
        image_id or uuid4(), TileKey(0), 0, 1, 0, 1 << 20, 1 << 20, bytes(16), Codec.ZSTD
    )
    return encode_chunk(header, frame)


def bomb_chunk(raw_length: int, decoded: int) -> bytes:
    """A frame that does not declare its size and decodes to far more than the header says."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False)
    frame = compressor.compress(bytes(decoded))
    header = ChunkHeader(
        uuid4(), TileKey(0), 0, 1, 0, raw_length, raw_length, bytes(16), Codec.ZSTD
    )
    return encode_chunk(header, frame)


def during(site: Site, attack: threading.Thread) -> float:
    """Run the attack and, meanwhile, the well-behaved device's scan; its seconds to done."""
    attack.start()
    try:
        _, seconds = site.scan()
    finally:
        attack.join(timeout=300)
    return seconds


def test_poison_frame_and_retained_poison(site: Site) -> None:
    hostile = site.hostile()
    try:
        hostile.send(DeviceTopic.CHUNK, poison_chunk()).wait_for_publish(10)
        hostile.send(DeviceTopic.CHUNK, poison_chunk(), retain=True).wait_for_publish(10)
        hostile.wait_reason("malformed", 2)
        site.ingest.stop()  # at every start the broker delivers the retained poison again
        site.ingest.start("run")
        hostile.wait_reason("malformed", 3)
        details = [a.get("detail", "") for a in hostile.acks if a.get("reason") == "malformed"]
        assert "declares 1099511627776 bytes" in details[0]
        assert "retained" in details[-1]
    finally:
        hostile.close()
    from tests.hostile._ingest_fixtures import RssSampler

    site.rss = RssSampler(site.ingest.proc.pid if site.ingest.proc else 0)
    _, seconds = site.scan()
    site.assert_unharmed(seconds)


def test_decompression_bombs(site: Site) -> None:
    hostile = site.hostile()
    try:
        hostile.flood(DeviceTopic.CHUNK, [bomb_chunk(128 * 1024, 256 * MiB) for _ in range(4)])
        hostile.wait_reason("malformed", 4)
        assert all("differs from header" in a["detail"] for a in hostile.acks)
        # The amplification the quota allows: an image larger than the staging quota is
        # refused at its open, before a single chunk is taken.
        big = make_manifest(
            rows=8, columns=8, tile=(2048, 2048), size_z=1, size_c=1, channels=["DAPI"]
        )  # 64 tiles of 8 MiB
        hostile.send(DeviceTopic.OPEN, big.to_bytes())
        hostile.wait_reason("quota_exceeded")
    finally:
        hostile.close()
    _, seconds = site.scan()
    site.assert_unharmed(seconds)


def test_open_flood(site: Site) -> None:
    hostile = site.hostile()
    small = [
        make_manifest(
            rows=1, columns=1, tile=(1, 1), size_z=1, size_c=1, channels=["DAPI"]
        ).to_bytes()
        for _ in range(300)
    ]
    huge = make_manifest(rows=200, columns=180, size_z=1, size_c=1, channels=["DAPI"])
    huge_opens = [huge.model_copy(update={"image_id": uuid4()}).to_bytes() for _ in range(12)]

    def attack() -> None:
        hostile.flood(DeviceTopic.OPEN, small)
        hostile.flood(DeviceTopic.OPEN, huge_opens)

    try:
        seconds = during(site, threading.Thread(target=attack))
        wait_for(lambda: len(hostile.acks) >= 30, 60, "answers to the flood")
        reasons = hostile.reasons()
        assert reasons.count(None) <= 16  # accepted: up to max_open_images_per_device
        assert "quota_exceeded" in reasons
        refused = [a for a in hostile.acks if a.get("reason") == "quota_exceeded"]
        assert any("images are receiving" in a["detail"] for a in refused)
    finally:
        hostile.close()
    site.assert_unharmed(seconds)


def test_chunk_flood(site: Site) -> None:
    hostile = site.hostile()
    garbage = [b"TB\x01" + bytes(120) for _ in range(30_000)]
    try:
        seconds = during(
            site, threading.Thread(target=hostile.flood, args=(DeviceTopic.CHUNK, garbage))
        )
        hostile.wait_reason("malformed")
        reasons = set(hostile.reasons())
        assert reasons <= {"malformed", "rate_limited"}, reasons
    finally:
        hostile.close()
    site.assert_unharmed(seconds)


def test_zero_length_flood(site: Site) -> None:
    hostile = site.hostile()
    target = make_manifest(rows=1, columns=1, size_z=1, size_c=1, channels=["DAPI"])
    digest = tile_digest(bytes(target.tile_bytes))

    def empty_chunks() -> Iterator[bytes]:
        for index in range(30_000):
            header = ChunkHeader(
                target.image_id, TileKey(0), index, 30_000, 0, target.tile_bytes, 0, digest
            )
            yield encode_chunk(header, b"")

    try:
        hostile.send(DeviceTopic.OPEN, target.to_bytes()).wait_for_publish(10)
        seconds = during(
            site, threading.Thread(target=hostile.flood, args=(DeviceTopic.CHUNK, empty_chunks()))
        )
        hostile.wait_reason("out_of_range")
        assert set(hostile.reasons()) <= {None, "out_of_range", "rate_limited"}
    finally:
        hostile.close()
    site.assert_unharmed(seconds)


def test_image_id_squatting(site: Site) -> None:
    """The attacker knows the id the microscope will use and opens it first, with junk."""
    manifest = SCAN.manifest()
    junk = make_manifest(
        image_id=manifest.image_id, rows=1, columns=1, size_z=1, size_c=1, channels=["DAPI"]
    )
    hostile = site.hostile()
    try:
        hostile.send(DeviceTopic.OPEN, junk.to_bytes()).wait_for_publish(10)
        wait_for(lambda: hostile.acks, 30, "the junk open answered")
        hostile.send(DeviceTopic.CHUNK, poison_chunk(manifest.image_id)).wait_for_publish(10)
        image_id, seconds = site.scan(manifest)
    finally:
        hostile.close()
    assert image_id == manifest.image_id
    (stored,) = site.archive_files()
    assert stored.relative_to(site.data_dir / "archive").parts[0] == GOOD
    assert str(manifest.image_id) in stored.name
    assert not (site.data_dir / "archive" / HOSTILE).exists()
    site.assert_unharmed(seconds)


def test_archive_names_never_collide(site: Site) -> None:
    """Two images whose ids share their first 8 hex digits, same name: two archive files."""
    base = SCAN.manifest()
    first = base.model_copy(update={"image_id": UUID("12345678-0000-4000-8000-000000000001")})
    second = base.model_copy(update={"image_id": UUID("12345678-0000-4000-8000-000000000002")})
    _, one = site.scan(first)
    _, two = site.scan(second, spool="spool-2")
    names = sorted(p.name for p in site.archive_files())
    assert names == sorted(f"{base.image_name}_{m.image_id}.ome.tif" for m in (first, second))
    site.assert_unharmed(max(one, two))

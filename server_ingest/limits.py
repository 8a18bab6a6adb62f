"""Per-device limits, pure: a token bucket, the device's accounting, and the checks.

Owned by the core thread. Every check runs before the work it bounds: the bucket before a
message is parsed, the manifest budget before an open is parsed, the chunk geometry before a
chunk is placed, the quotas before a tile is started. Checks return the refusal (or None);
the core answers it on the device's ack topic and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server_ingest.settings import Limits
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.framing import ChunkHeader
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.reasons import ReasonCode


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.tokens < 0:  # a new device starts with a full bucket
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


@dataclass
class DeviceBook:
    """A device's rate and parked messages (what it holds is counted from the image books)."""

    bucket: TokenBucket
    json_bucket: TokenBucket
    answers: TokenBucket
    """Refusals answered (see `Limits.refusals_answered_per_s_per_device`)."""
    parked_bytes: int = 0
    """Messages held until the ledger answered about their image."""
    last_told: dict[ReasonCode, float] = field(default_factory=dict)

    @classmethod
    def new(cls, limits: Limits) -> DeviceBook:
        return cls(
            TokenBucket(limits.message_rate_per_device, limits.message_burst_per_device),
            TokenBucket(limits.json_bytes_per_s_per_device, limits.json_burst_bytes_per_device),
            TokenBucket(
                limits.refusals_answered_per_s_per_device,
                2 * limits.refusals_answered_per_s_per_device,
            ),
        )

    def should_tell(self, reason: ReasonCode, now: float, every_s: float = 1.0) -> bool:
        """Refusals of a flood are answered once a second, not once a message."""
        if now - self.last_told.get(reason, -every_s) < every_s:
            return False
        self.last_told[reason] = now
        return True


def image_bytes(m: OpenManifest) -> int:
    return m.tile_count * m.tile_bytes


def check_manifest(limits: Limits, m: OpenManifest) -> ProtocolError | None:
    """Limits one image can never meet: the open is refused for good."""
    if m.tile_bytes > limits.max_tile_bytes:
        return ProtocolError(
            ReasonCode.QUOTA_EXCEEDED, f"tile of {m.tile_bytes} bytes > {limits.max_tile_bytes}"
        )
    if m.tile_count > limits.max_tiles_per_image:
        return ProtocolError(
            ReasonCode.QUOTA_EXCEEDED, f"{m.tile_count} tiles > {limits.max_tiles_per_image}"
        )
    size = image_bytes(m)
    for limit, what in (
        (limits.max_image_bytes, "the image limit"),
        (limits.max_staged_bytes_per_device, "the device's staging quota"),
        (limits.max_declared_bytes_per_device, "the device's declared-bytes limit"),
    ):
        if size > limit:
            return ProtocolError(
                ReasonCode.QUOTA_EXCEEDED, f"image of {size} bytes > {what} {limit}"
            )
    return None


def check_admission(
    limits: Limits, receiving: int, declared: int, manifests: int, m: OpenManifest, json_bytes: int
) -> str | None:
    """Limits a new image must fit into now; they free up as the device's images finish."""
    if receiving >= limits.max_open_images_per_device:
        return (
            f"{receiving} images are receiving, the limit is "
            f"{limits.max_open_images_per_device}: open refused for now"
        )
    if declared + image_bytes(m) > limits.max_declared_bytes_per_device:
        return (
            f"{declared} bytes declared by receiving images, this one adds "
            f"{image_bytes(m)}, the limit is {limits.max_declared_bytes_per_device}"
        )
    if manifests + json_bytes > limits.max_manifest_bytes_per_device:
        return (
            f"manifests of {manifests} bytes held, the limit is "
            f"{limits.max_manifest_bytes_per_device}: open refused for now"
        )
    return None


def check_chunk(limits: Limits, header: ChunkHeader, tile_bytes: int) -> ProtocolError | None:
    """A chunk that cannot belong to a tile of `tile_bytes` bytes as cut by an honest sender."""
    if header.tile_bytes != tile_bytes:
        return ProtocolError(
            ReasonCode.OUT_OF_RANGE,
            f"tile of {header.tile_bytes} bytes, manifest says {tile_bytes}",
        )
    count = header.chunk_count
    if count > limits.max_chunks_per_tile:
        return ProtocolError(
            ReasonCode.QUOTA_EXCEEDED, f"{count} chunks per tile > {limits.max_chunks_per_tile}"
        )
    fewest = -(-tile_bytes // limits.max_chunk_bytes) if tile_bytes else 1
    if count < fewest or (tile_bytes and count > tile_bytes) or (not tile_bytes and count != 1):
        return ProtocolError(
            ReasonCode.OUT_OF_RANGE, f"{count} chunks cannot make a tile of {tile_bytes} bytes"
        )
    if header.raw_length == 0 and tile_bytes:
        return ProtocolError(ReasonCode.OUT_OF_RANGE, "an empty chunk of a non-empty tile")
    return None

"""Reason codes: why a message was refused or a tile must be sent again."""

from __future__ import annotations

from enum import StrEnum


class ReasonCode(StrEnum):
    MALFORMED = "malformed"
    """The message cannot be parsed (bad JSON, bad magic, truncated header, invalid fields)."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """The protocol version is not one this side speaks."""
    OVERSIZE = "oversize"
    """The message or the tile is larger than the receiver's limit."""
    BAD_CHECKSUM = "bad_checksum"
    """A chunk's checksum does not match its bytes: send the tile again."""
    DIGEST_MISMATCH = "digest_mismatch"
    """All chunks arrived but the whole tile's digest does not match: send the tile again."""
    UNKNOWN_IMAGE = "unknown_image"
    """No `open` manifest is known for this image: send `open` again, then the tile."""
    CONFLICT = "conflict"
    """The message contradicts what was already received for the same image or tile."""
    OUT_OF_RANGE = "out_of_range"
    """The tile key or chunk geometry lies outside what the manifest declares."""
    INVALID_MANIFEST = "invalid_manifest"
    """A manifest field breaks a rule (dims, dtype, names, positions, limits)."""
    QUOTA_EXCEEDED = "quota_exceeded"
    """The device or image exceeds a size limit set by the server's policy."""
    NOT_PERMITTED = "not_permitted"
    """The server's policy does not let this device write there."""
    STORAGE_FAILED = "storage_failed"
    """The storage backend refused the image permanently; the data stays staged."""
    VERIFY_FAILED = "verify_failed"
    """The storage backend holds other pixels than the ingest wrote (their digests differ),
    again after rewriting the image; the data stays staged."""
    LOST_STATE = "lost_state"
    """The receiver lost a partial tile (e.g. it restarted): send the tile again."""
    RATE_LIMITED = "rate_limited"
    """The device sends more messages per second than the server's policy allows; the
    message was not processed: send it again later (the device's timeouts do)."""
    UNAVAILABLE = "unavailable"
    """The receiver cannot take this now (its disk is full, it is busy); nothing was kept:
    send it again later (the device's timeouts do)."""
    INTERNAL_ERROR = "internal_error"
    """The receiver failed on this message for a reason of its own (a bug); it was not
    processed and is logged for an admin. Sending it again is safe but may fail the same way."""

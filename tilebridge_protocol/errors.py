"""The few exceptions tilebridge raises. Whether a fault is retried is decided by its type.

`TransientError` means "try again later, nothing is lost" (broker or OMERO down, disk full);
`PermanentError` means "retrying the same thing will fail the same way" (bad input, no
permission). `ProtocolError` carries the reason code that goes back to the device.
"""

from __future__ import annotations

from typing import ClassVar

from tilebridge_protocol.reasons import ReasonCode


class TilebridgeError(Exception):
    """Base of every tilebridge error."""

    retryable: ClassVar[bool] = False


class TransientError(TilebridgeError):
    """A fault that may pass: retry with backoff, keep the data."""

    retryable = True


class PermanentError(TilebridgeError):
    """A fault that will not pass by retrying: report it, keep the data aside."""

    retryable = False


class ProtocolError(PermanentError):
    """A message that breaks the wire protocol; `reason` is sent back to the device."""

    def __init__(self, reason: ReasonCode, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

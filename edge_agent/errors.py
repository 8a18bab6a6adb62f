"""The front door's refusals beyond `TransientError` / `PermanentError`.

Every entry point maps them the same way: `TransientError` -> 503 (retry shortly, nothing
was accepted), `ConflictError` -> 409 naming the field, `UnknownExperimentError` -> 404, any
other `PermanentError` -> 422 with the reason.
"""

from __future__ import annotations

from tilebridge_protocol.errors import PermanentError


class ConflictError(PermanentError):
    """The request contradicts what the agent already accepted (a resumed experiment's
    field, a repeated frame with other pixels); `field` names what differs."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class UnknownExperimentError(PermanentError):
    """No experiment with this image_id on this agent (never started, or forgotten after
    its retention period)."""

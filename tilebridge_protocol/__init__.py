"""tilebridge wire protocol v1: topics, messages, chunk framing and checksums.

Shared by the edge agent and the server ingest; imports neither. See docs/protocol.md.
"""

from tilebridge_protocol.errors import (
    PermanentError,
    ProtocolError,
    TilebridgeError,
    TransientError,
)
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import PROTOCOL_VERSION
from tilebridge_protocol.reasons import ReasonCode

__all__ = [
    "PROTOCOL_VERSION",
    "PermanentError",
    "ProtocolError",
    "ReasonCode",
    "TileKey",
    "TilebridgeError",
    "TransientError",
]

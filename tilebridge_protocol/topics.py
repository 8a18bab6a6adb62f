"""Every MQTT topic of protocol v1 is built and parsed here, nowhere else.

    tilebridge/v1/dev/<device>/open      device -> ingest  JSON OpenManifest         QoS 1
    tilebridge/v1/dev/<device>/chunk     device -> ingest  binary chunk (framing)    QoS 1
    tilebridge/v1/dev/<device>/close     device -> ingest  JSON CloseManifest        QoS 1
    tilebridge/v1/dev/<device>/ack       ingest -> device  JSON Ack                  QoS 1
    tilebridge/v1/dev/<device>/status    device, retained  JSON DeviceStatus (+ last will)
    tilebridge/v1/ingest/<instance>/status   retained      JSON IngestStatus (+ last will)
    tilebridge/v1/image/<device>/<image_id>/status  retained  JSON ImageStatus
    tilebridge/v1/image/<device>/<image_id>/preview retained  PNG, the live mosaic preview
    tilebridge/v1/ingest/<instance>/relay/dev/<device>/<kind>   ingest -> ingest (relays)

The device id is the MQTT username, so a broker ACL pattern (`%u`) pins each device to its
own `dev/<device>/` tree.
"""

from __future__ import annotations

import re
from enum import StrEnum
from uuid import UUID

from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.reasons import ReasonCode

ROOT = "tilebridge/v1"

# Letters, digits, '_', '.', '-': safe as an MQTT topic level, a file name and a username.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class DeviceTopic(StrEnum):
    OPEN = "open"
    CHUNK = "chunk"
    CLOSE = "close"
    ACK = "ack"
    STATUS = "status"


UPSTREAM = (DeviceTopic.OPEN, DeviceTopic.CHUNK, DeviceTopic.CLOSE)
"""What a device sends and the ingest subscribes to."""


def check_device_id(device: str) -> str:
    if not _DEVICE_ID.fullmatch(device) or ".." in device:
        raise ProtocolError(ReasonCode.MALFORMED, f"invalid device id {device!r}")
    return device


def device_topic(device: str, kind: DeviceTopic) -> str:
    return f"{ROOT}/dev/{check_device_id(device)}/{kind.value}"


def device_filter(kind: DeviceTopic) -> str:
    """Subscription filter matching `kind` messages of every device."""
    return f"{ROOT}/dev/+/{kind.value}"


def parse_device_topic(topic: str) -> tuple[str, DeviceTopic]:
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT or parts[2] != "dev":
        raise ProtocolError(ReasonCode.MALFORMED, f"not a tilebridge device topic: {topic!r}")
    if parts[1] != "v1":
        raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION, f"topic version {parts[1]!r}")
    try:
        kind = DeviceTopic(parts[4])
    except ValueError:
        raise ProtocolError(ReasonCode.MALFORMED, f"unknown message kind {parts[4]!r}") from None
    return check_device_id(parts[3]), kind


def ingest_status_topic(instance: str) -> str:
    return f"{ROOT}/ingest/{check_device_id(instance)}/status"


INGEST_STATUS_FILTER = f"{ROOT}/ingest/+/status"


def shared_filter(group: str, topic_filter: str) -> str:
    """The MQTT 5 shared subscription of `group` to `topic_filter`: the broker hands each
    matching message to one member of the group."""
    return f"$share/{check_device_id(group)}/{topic_filter}"


def relay_topic(instance: str, topic: str) -> str:
    """Where an ingest instance forwards a device message to `instance`, the one that holds
    the device (docs/scale.md): the device topic below the instance's relay level."""
    device, kind = parse_device_topic(topic)
    return f"{ROOT}/ingest/{check_device_id(instance)}/relay/dev/{device}/{kind.value}"


def relay_filter(instance: str) -> str:
    return f"{ROOT}/ingest/{check_device_id(instance)}/relay/#"


def parse_relay_topic(topic: str) -> str | None:
    """The device topic a relayed message came on, or None if `topic` is not a relay topic."""
    parts = topic.split("/")
    if len(parts) == 8 and "/".join(parts[:3]) == f"{ROOT}/ingest" and parts[4] == "relay":
        return "/".join([ROOT, *parts[5:]])
    return None


def parse_ingest_status_topic(topic: str) -> str | None:
    """The instance of an ingest status topic, or None if `topic` is not one."""
    parts = topic.split("/")
    if len(parts) == 5 and "/".join(parts[:3]) == f"{ROOT}/ingest" and parts[4] == "status":
        return parts[3]
    return None


def image_status_topic(device: str, image_id: UUID) -> str:
    return f"{ROOT}/image/{check_device_id(device)}/{image_id}/status"


IMAGE_STATUS_FILTER = f"{ROOT}/image/+/+/status"


def image_preview_topic(device: str, image_id: UUID) -> str:
    return f"{ROOT}/image/{check_device_id(device)}/{image_id}/preview"


IMAGE_PREVIEW_FILTER = f"{ROOT}/image/+/+/preview"
DEVICE_STATUS_FILTER = f"{ROOT}/dev/+/status"

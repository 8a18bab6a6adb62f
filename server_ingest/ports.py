"""What the core drives, as interfaces: each is implemented by a part that owns its own
thread (ledger writer, stager, storer) or by the broker connection (outbox). The core calls
them from its thread only; none of them blocks."""

from __future__ import annotations

from typing import Protocol

from server_ingest.events import Inbound
from server_ingest.ledger.records import ImageKey, Record
from server_ingest.lifecycle import Event
from server_ingest.stager import Job
from server_ingest.storer import Command
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import AnyAck, OpenManifest
from tilebridge_protocol.status import ImageStatus


class LedgerPort(Protocol):
    def persist(self, records: tuple[Record, ...], token: int) -> None: ...

    def lookup(self, key: ImageKey) -> None: ...


class StagerPort(Protocol):
    def submit(self, job: Job) -> None: ...


class StorerPort(Protocol):
    def submit(self, command: Command) -> None: ...


class PreviewPort(Protocol):
    def tile(self, key: ImageKey, manifest: OpenManifest, tile: TileKey) -> None: ...

    def done(self, key: ImageKey) -> None: ...


class Outbox(Protocol):
    """Where answers go: the broker in production, a list in tests."""

    def ack(self, device: str, ack: AnyAck) -> None: ...

    def image_status(self, status: ImageStatus, done: bool) -> None: ...


class Relay(Protocol):
    """Forwards a device message to the instance holding its device (the broker)."""

    def relay(self, instance: str, message: Inbound) -> None: ...


class Driver(Protocol):
    """What the message intake asks of the core (core.Core implements it)."""

    def apply(self, key: ImageKey, event: Event, manifest_size: int = 0) -> None: ...

    def send(self, device: str, ack: AnyAck) -> None: ...

    def after_durable(self, device: str, ack: AnyAck) -> None: ...

    def refuse(self, device: str, reason: str, detail: str) -> None: ...

    def stage(self, job: Job) -> None: ...

    def park(self, key: ImageKey, message: Inbound) -> bool: ...

    def publish(self, key: ImageKey, force: bool) -> None: ...

    def now(self) -> float: ...

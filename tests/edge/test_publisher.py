"""The publisher alone, against a fake broker connection: what it sends, when it sends it
again, and what it forgets on which ack."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from devtools.stack import wait_for
from edge_agent.flights import Mailbox
from edge_agent.publisher import Publisher
from edge_agent.settings import AgentSettings
from edge_agent.spool import Spool
from tilebridge_protocol.framing import decode_chunk
from tilebridge_protocol.messages import (
    CreditAck,
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    OpenManifest,
    TileAck,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage.testing.manifests import make_manifest, make_tiles


class FakeConnection:
    """Records publishes; PUBACKs only when told to (`auto_puback`)."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[tuple[str, bytes]] = []
        self.auto_puback = True
        self.puback_first = False
        """PUBACK from inside publish(), before it returns (a fast broker on loopback)."""
        self.publisher: Publisher | None = None
        self._mid = 0
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, **_: Any) -> Any:
        with self._lock:
            self._mid += 1
            mid = self._mid
            self.sent.append((topic, payload))
        if self.puback_first and self.publisher is not None:
            self.publisher.on_published(mid)
        elif self.auto_puback and self.publisher is not None:
            threading.Timer(0.001, self.publisher.on_published, args=(mid,)).start()
        return type("Info", (), {"rc": mqtt.MQTT_ERR_SUCCESS, "mid": mid})()

    def tiles_sent(self) -> list[Any]:
        with self._lock:
            chunks = [decode_chunk(p)[0] for t, p in self.sent if t.endswith("/chunk")]
        return [(h.tile, h.chunk_index) for h in chunks]

    def kinds(self) -> list[str]:
        with self._lock:
            return [t.rsplit("/", 1)[1] for t, _ in self.sent]


Rig = tuple[Publisher, FakeConnection, Spool, OpenManifest]


@contextmanager
def make_rig(
    tmp_path: Path,
    timeout_s: float,
    auto_puback: bool = True,
    max_timeout_s: float | None = None,
    puback_first: bool = False,
) -> Iterator[Rig]:
    settings = AgentSettings(
        spool_dir=tmp_path, min_free_bytes=0, commit_timeout_s=timeout_s,
        max_commit_timeout_s=max_timeout_s or 2 * timeout_s, chunk_size=4096,
    )  # fmt: skip
    mailbox = Mailbox()
    buffer = Spool(tmp_path, on_queued=mailbox.ring)
    connection = FakeConnection()
    connection.auto_puback = auto_puback
    connection.puback_first = puback_first
    publisher = Publisher(settings, buffer, connection, mailbox)  # type: ignore[arg-type]
    connection.publisher = publisher
    manifest = make_manifest(rows=1, columns=2)
    buffer.create(manifest, {}, to_server=True, local_hold=False)
    for key, pixels in make_tiles(manifest).items():
        buffer.add_tile(manifest.image_id, key, pixels.astype("<u2").tobytes())
    buffer.close_image(manifest.image_id)
    publisher.start()
    try:
        yield publisher, connection, buffer, manifest
    finally:
        publisher.stop()
        buffer.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Timeouts far beyond any test: every resend seen here was asked for by an ack."""
    with make_rig(tmp_path, timeout_s=600) as parts:
        yield parts


def _ack(publisher: Publisher, ack: Any) -> None:
    publisher._mailbox.post("ack", ack)  # what on_message does after decoding


def test_everything_is_sent_once_then_again_until_acknowledged(tmp_path: Path) -> None:
    with make_rig(tmp_path, timeout_s=0.3) as (_, connection, buffer, manifest):
        _everything_sent_twice(connection, buffer, manifest)


def _everything_sent_twice(connection: FakeConnection, buffer: Spool, manifest: Any) -> None:
    per_tile = -(-manifest.tile_bytes // 4096)
    first_round = 2 + manifest.tile_count * per_tile
    wait_for(lambda: len(connection.sent) >= first_round, 10, "the first round")
    assert connection.kinds()[0] == "open"
    # No ack comes: after commit_timeout_s everything is sent again.
    wait_for(lambda: len(connection.sent) >= 2 * first_round, 10, "a second round")
    assert buffer.stats().tiles == manifest.tile_count  # nothing was forgotten meanwhile


def test_committed_tiles_leave_the_buffer_and_complete_forgets_the_image(rig: Any) -> None:
    publisher, connection, buffer, manifest = rig
    wait_for(lambda: "close" in connection.kinds(), 10, "the close manifest")
    _ack(publisher, OpenAck(image_id=manifest.image_id, state=ManifestState.ACCEPTED))
    for key in manifest.tile_keys():
        _ack(publisher, TileAck(image_id=manifest.image_id, tile=key, state=TileState.COMMITTED))
    wait_for(lambda: buffer.stats().tiles == 0, 10, "every tile forgotten")
    _ack(publisher, ImageAck(image_id=manifest.image_id, state=ImageState.COMPLETE))
    wait_for(lambda: buffer.image(manifest.image_id).server == "complete", 10, "complete")
    assert not (buffer.tiles_dir / str(manifest.image_id)).exists()
    assert publisher.counters.committed_tiles == manifest.tile_count
    assert (publisher.counters.inflight_tiles, publisher.counters.inflight_bytes) == (0, 0)
    assert buffer.counts(manifest.image_id).committed == manifest.tile_count


def test_an_image_ack_never_drops_tiles_still_pending(rig: Any) -> None:
    publisher, connection, buffer, manifest = rig
    wait_for(lambda: "close" in connection.kinds(), 10, "the close manifest")
    _ack(publisher, ImageAck(image_id=manifest.image_id, state=ImageState.FAILED))
    time.sleep(0.2)  # let the publisher handle it (absence of an effect)
    assert buffer.image(manifest.image_id).server == "sending"
    assert buffer.stats().tiles == manifest.tile_count


def test_retransmit_sends_the_tile_at_once_and_rejected_sets_it_aside(rig: Any) -> None:
    publisher, connection, buffer, manifest = rig
    first, second = manifest.tile_keys()[:2]
    wait_for(lambda: "close" in connection.kinds(), 10, "the close manifest")
    before = connection.tiles_sent().count((first, 0))
    _ack(publisher, TileAck(image_id=manifest.image_id, tile=first, state=TileState.RETRANSMIT,
                            reason=ReasonCode.BAD_CHECKSUM))  # fmt: skip
    wait_for(
        lambda: connection.tiles_sent().count((first, 0)) > before, 0.25, "an immediate resend"
    )
    _ack(publisher, TileAck(image_id=manifest.image_id, tile=second, state=TileState.REJECTED,
                            reason=ReasonCode.OUT_OF_RANGE, detail="test"))  # fmt: skip
    wait_for(lambda: publisher.counters.rejected_tiles == 1, 10, "the rejection")
    assert buffer.stats().tiles == manifest.tile_count - 1
    assert buffer.counts(manifest.image_id).rejected == 1  # one source for every count
    assert list((buffer.rejected_dir / str(manifest.image_id)).glob("*.tile"))


def test_a_tile_whose_pubacks_never_come_is_sent_again(tmp_path: Path) -> None:
    # As if the broker lost its session, and our messages with it: no PUBACK ever comes.
    with make_rig(tmp_path, timeout_s=0.3, auto_puback=False) as (publisher, connection, _, m):
        first = m.tile_keys()[0]
        wait_for(lambda: connection.tiles_sent().count((first, 0)) >= 2, 10, "a resend")
        assert publisher.counters.inflight_tiles == m.tile_count  # still held, not forgotten


def test_a_tile_never_acknowledged_is_named_on_the_status_and_still_sent(tmp_path: Path) -> None:
    with make_rig(tmp_path, timeout_s=0.2) as (publisher, connection, buffer, manifest):
        publisher.use_settings(publisher.settings.model_copy(update={"warn_after_sends": 2}))
        wait_for(lambda: publisher.last_error, 20, "the warning")
        assert "got no ack after 2 sends" in (publisher.last_error or "")
        sends = len(connection.sent)
        wait_for(lambda: len(connection.sent) > sends, 20, "sending on")
        assert buffer.stats().tiles == manifest.tile_count


def test_a_puback_before_publish_returns_is_not_lost(tmp_path: Path) -> None:
    """The network thread may see a PUBACK before `publish()` has returned its message id:
    it waits in the owner's mailbox, so the flight's timer starts (resend after 0.3 s, not
    after the 60 s a flight whose PUBACKs never came waits)."""
    with make_rig(tmp_path, timeout_s=0.3, max_timeout_s=60, puback_first=True) as rig:
        _, connection, _, manifest = rig
        first = manifest.tile_keys()[0]
        wait_for(lambda: connection.tiles_sent().count((first, 0)) >= 2, 10, "a timed resend")


def test_the_last_error_leaves_when_its_condition_clears(rig: Any) -> None:
    publisher, connection, _buffer, manifest = rig
    _ack(publisher, ErrorAck(image_id=manifest.image_id, reason=ReasonCode.UNKNOWN_IMAGE,
                             detail="close for an image without an accepted open",
                             topic="tilebridge/v1/dev/scope-1/close"))  # fmt: skip
    wait_for(lambda: publisher.last_error, 10, "the error")
    wait_for(lambda: "close" in connection.kinds(), 10, "the close manifest")
    for key in manifest.tile_keys():
        _ack(publisher, TileAck(image_id=manifest.image_id, tile=key, state=TileState.COMMITTED))
    _ack(publisher, ImageAck(image_id=manifest.image_id, state=ImageState.COMPLETE))
    wait_for(lambda: publisher.last_error is None, 10, "the error to clear")


def test_the_servers_window_bounds_what_is_in_flight(tmp_path: Path) -> None:
    """A `credit` ack sets the window: 0 holds everything back, one tile's worth lets one
    go at a time, and the window never exceeds the agent's own `inflight_bytes`."""
    settings = AgentSettings(
        spool_dir=tmp_path, min_free_bytes=0, commit_timeout_s=600, chunk_size=4096,
        inflight_bytes=1024 * 1024,
    )  # fmt: skip
    mailbox = Mailbox()
    buffer = Spool(tmp_path, on_queued=mailbox.ring)
    connection = FakeConnection()
    publisher = Publisher(settings, buffer, connection, mailbox)  # type: ignore[arg-type]
    connection.publisher = publisher
    manifest = make_manifest(rows=1, columns=2)
    buffer.create(manifest, {}, to_server=True, local_hold=False)
    for key, pixels in make_tiles(manifest).items():
        buffer.add_tile(manifest.image_id, key, pixels.astype("<u2").tobytes())
    buffer.close_image(manifest.image_id)
    _ack(publisher, CreditAck(window_bytes=0))  # before the first flight
    publisher.start()
    try:
        time.sleep(0.5)
        assert connection.sent == []  # everything held back on the Pi's disk
        _ack(publisher, CreditAck(window_bytes=manifest.tile_bytes))
        wait_for(connection.tiles_sent, 10, "a tile")
        time.sleep(0.3)
        sent = {tile for tile, _ in connection.tiles_sent()}
        assert len(sent) == 1 and publisher.counters.inflight_tiles == 1
        first = sent.pop()
        _ack(publisher, TileAck(image_id=manifest.image_id, tile=first, state=TileState.COMMITTED))
        wait_for(lambda: len({t for t, _ in connection.tiles_sent()}) == 2, 10, "the next tile")
        _ack(publisher, CreditAck(window_bytes=10**12))  # capped by inflight_bytes
        wait_for(lambda: publisher.counters.window_bytes == 1024 * 1024, 10, "the cap")
        every = manifest.tile_count
        wait_for(lambda: len({t for t, _ in connection.tiles_sent()}) == every, 10, "every tile")
    finally:
        publisher.stop()
        buffer.close()


def test_tiles_of_an_image_the_ingest_does_not_know_wait_for_its_open(rig: Any) -> None:
    """Chaos run on a low staging disk: the ingest refused the open for now (`unavailable`)
    and asked for every tile again (`unknown_image`). Sending each tile again at once, and
    the open with it, bounced the pixels back and forth until the backoff overflowed."""
    publisher, connection, _buffer, manifest = rig
    wait_for(lambda: "close" in connection.kinds(), 10, "the close manifest")
    image = manifest.image_id
    tiles_before, opens_before = len(connection.tiles_sent()), connection.kinds().count("open")
    for _ in range(50):
        for key in manifest.tile_keys():
            _ack(publisher, TileAck(image_id=image, tile=key, state=TileState.RETRANSMIT,
                                    reason=ReasonCode.UNKNOWN_IMAGE))  # fmt: skip
        _ack(publisher, ErrorAck(image_id=image, reason=ReasonCode.UNAVAILABLE,
                                 detail="the staging disk is low", topic="x/open"))  # fmt: skip
    wait_for(lambda: publisher.counters.retransmits == 50 * manifest.tile_count, 10, "the acks")
    # One open again (not one per ack), and no pixels until the open is accepted.
    wait_for(lambda: connection.kinds().count("open") == opens_before + 1, 10, "the open")
    assert len(connection.tiles_sent()) == tiles_before
    _ack(publisher, OpenAck(image_id=image, state=ManifestState.ACCEPTED))
    for key in manifest.tile_keys():
        wait_for(lambda k=key: connection.tiles_sent().count((k, 0)) == 2, 10, f"{key} again")


def test_the_backoff_stays_bounded_after_any_number_of_sends(tmp_path: Path) -> None:
    with make_rig(tmp_path, timeout_s=0.5, max_timeout_s=7.0) as (publisher, *_):
        from edge_agent.flights import Flight

        flight = Flight(item=None, attempts=5000)  # type: ignore[arg-type]
        assert publisher._timeout(flight) == 7.0

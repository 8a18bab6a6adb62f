"""The dashboard's status board: what it keeps, links, drops and tells its listeners."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from server_ingest.dashboard.board import StatusBoard, classify, omero_link
from tilebridge_protocol.messages import utcnow
from tilebridge_protocol.status import DeviceStatus, ImagePhase, ImageStatus, Liveness
from tilebridge_protocol.topics import DeviceTopic, device_topic, image_status_topic

WEB = "https://omero.example.org"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def image(phase: ImagePhase = ImagePhase.COMPLETE, **fields: Any) -> ImageStatus:
    values: dict[str, Any] = dict(
        at=utcnow(),
        device="scope-1",
        image_id=uuid4(),
        experiment="e",
        image_name="i",
        phase=phase,
        tiles_total=4,
        tiles_received=4,
        tiles_committed=4,
        tiles_stored=4,
    )
    values.update(fields)
    return ImageStatus.model_validate(values)


def test_classify_status_topics() -> None:
    image_id = uuid4()
    assert classify(device_topic("scope-1", DeviceTopic.STATUS)) == ("device", "scope-1")
    assert classify("tilebridge/v1/ingest/ingest-1/status") == ("ingest", "ingest-1")
    assert classify(image_status_topic("scope-1", image_id)) == ("image", f"scope-1/{image_id}")
    assert classify(device_topic("scope-1", DeviceTopic.ACK)) is None
    assert classify("other/v1/dev/scope-1/status") is None


def test_omero_link_only_with_a_web_address_and_an_omero_image() -> None:
    assert omero_link(WEB, {"omero": "omero:Image:42"}) == f"{WEB}/webclient/?show=image-42"
    assert omero_link(WEB, {"omero": "omero:Image:7@omero.example.org:4064"}).endswith("image-7")
    assert omero_link(None, {"omero": "omero:Image:42"}) is None
    assert omero_link(WEB, {"archive": "/srv/a.ome.tif", "omero": "omero:Dataset:3"}) is None


def test_board_keeps_links_and_tells_listeners_in_order() -> None:
    board = StatusBoard(WEB)
    events: list[Any] = []
    snapshot, unsubscribe = board.listen(events.append)
    assert snapshot["entries"] == [] and snapshot["omero_web_url"] == WEB
    stored = image(locations={"omero": "omero:Image:9"})
    topic = image_status_topic(stored.device, stored.image_id)
    board.apply(topic, stored.to_bytes())
    board.apply(topic, b"")  # a cleared retained message
    unsubscribe()
    board.apply(topic, stored.to_bytes())
    assert [e["type"] for e in events] == ["status", "remove"]
    assert events[0]["entry"]["links"] == {"omero": f"{WEB}/webclient/?show=image-9"}
    assert events[0]["entry"]["status"]["image_id"] == str(stored.image_id)
    assert len(board.snapshot()["entries"]) == 1


def test_board_ignores_invalid_or_misaddressed_status() -> None:
    board = StatusBoard()
    topic = device_topic("scope-1", DeviceTopic.STATUS)
    board.apply(topic, b'{"not": "a status"}')
    other = DeviceStatus(at=utcnow(), device="scope-2", state=Liveness.ONLINE)
    board.apply(topic, other.to_bytes())  # names another device than its topic
    assert board.snapshot()["entries"] == [] and board.ignored == 2


def test_finished_images_expire_with_their_retained_message() -> None:
    clock = Clock()
    board = StatusBoard(clock=clock)
    done, running = image(), image(ImagePhase.RECEIVING, tiles_stored=0)
    board.apply(image_status_topic(done.device, done.image_id), done.to_bytes(), expiry_s=60)
    board.apply(image_status_topic(running.device, running.image_id), running.to_bytes())
    clock.now += 59
    board.expire()
    assert len(board.snapshot()["entries"]) == 2
    clock.now += 2
    board.expire()
    (left,) = board.snapshot()["entries"]
    assert left["status"]["image_id"] == str(running.image_id)


def test_monitor_state_changes_are_events() -> None:
    board = StatusBoard()
    events: list[Any] = []
    board.listen(events.append)
    board.set_monitor(True, None)
    board.set_monitor(True, None)
    board.set_monitor(False, "connection refused")
    board.close()
    assert [e and e["type"] for e in events] == ["monitor", "monitor", None]
    assert board.snapshot()["monitor"] == {"connected": False, "last_error": "connection refused"}

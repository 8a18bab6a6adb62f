"""Several OMERO servers (issue 13): two stand-ins as two named targets, images routed by
device and project, each written with its target's own account; one target down delays only
its own images, the other's complete meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

from server_ingest.app import Engine
from server_ingest.events import Inbound
from server_ingest.settings import IngestSettings
from tests.ingest.harness import Recorder, chunks, close_for, tiles_for
from tests.omero.helpers import expected_pixels, settings_for, unique_manifest
from tests.omero_standin.sessions import User
from tilebridge_protocol.messages import ImageAck, ImageState, OpenManifest
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic


class TwoTargets:
    def __init__(self, root: Path, a: Any, b: Any) -> None:
        self.a, self.b = a, b
        self.recorder = Recorder()
        self.settings = IngestSettings(
            data_dir=root,
            backends=("archive", "omero"),
            store_retry_s=0.1,
            store_retry_max_s=0.5,
            omero_targets={
                "facility": settings_for(a, keepalive_s=None, connect_timeout_s=2.0),
                "lab-b": settings_for(b, keepalive_s=None, connect_timeout_s=2.0),
            },
            routes=(
                {"device": "scope-b*", "target": "lab-b"},
                {"project": "Lab B *", "target": "lab-b"},
                {"device": "scope-*", "target": "facility"},
            ),
        )
        self.engine = Engine(self.settings, self.recorder).start()

    def scan(self, device: str, manifest: OpenManifest) -> Any:
        tiles = tiles_for(manifest)
        self._send(device, DeviceTopic.OPEN, manifest.to_bytes())
        for key, pixels in tiles.items():
            for message in chunks(manifest, key, pixels):
                self._send(device, DeviceTopic.CHUNK, message)
        self._send(device, DeviceTopic.CLOSE, close_for(manifest, tiles).to_bytes())
        return tiles

    def _send(self, device: str, kind: DeviceTopic, payload: bytes) -> None:
        self.engine.handle(Inbound(device_topic(device, kind), payload))

    def ack(self, manifest: OpenManifest, timeout: float = 60) -> ImageAck:
        return self.recorder.wait_image_ack(manifest.image_id, timeout)

    def close(self) -> None:
        self.engine.stop()


@pytest.fixture
def two(tmp_path: Path, omero_standin_factory: Any) -> Iterator[TwoTargets]:
    a = omero_standin_factory()
    b = omero_standin_factory(users=[User("lab-b-writer", "b-secret", "lab-b")])
    running = TwoTargets(tmp_path, a, b)
    yield running
    running.close()


def owner_of(server: Any, image: Any) -> str:
    owner_id = image.getDetails().getOwner().getId().getValue()
    return next(u.name for u in server.users.values() if u.id == owner_id)


def test_images_go_to_the_target_their_route_names(two: TwoTargets) -> None:
    by_device = unique_manifest(project="Facility scans")
    by_project = unique_manifest(project="Lab B imaging")
    by_default = unique_manifest(project="Facility scans")
    tiles = {
        "b": two.scan("scope-b2", by_device),
        "p": two.scan("scope-1", by_project),
        "d": two.scan("scope-1", by_default),
    }
    for manifest in (by_device, by_project, by_default):
        assert two.ack(manifest).state is ImageState.COMPLETE
    a, b = two.a.server, two.b.server
    names_a = sorted(i.getName().getValue() for i in a.images())
    names_b = sorted(i.getName().getValue() for i in b.images())
    assert names_a == [by_default.image_name]
    assert names_b == sorted([by_device.image_name, by_project.image_name])
    assert {owner_of(b, i) for i in b.images()} == {"lab-b-writer"}  # its own account
    [image] = a.images()
    pixels = a.pixels(image.getId().getValue())
    assert pixels.tobytes() == expected_pixels(by_default, tiles["d"]).tobytes()
    acks = {m.image_id: two.ack(m) for m in (by_device, by_project, by_default)}
    assert set(acks[by_device.image_id].locations) == {"archive", "lab-b"}
    assert set(acks[by_default.image_id].locations) == {"archive", "facility"}
    two.engine.wait_idle()
    assert dict(two.engine.snapshot().backends) == {
        "archive": "ok",
        "facility": "ok",
        "lab-b": "ok",
    }


def test_one_target_down_delays_only_its_images(two: TwoTargets) -> None:
    two.a.server.stop()
    for_a = unique_manifest(project="Facility scans")
    for_b = unique_manifest(project="Lab B imaging")
    two.scan("scope-1", for_a)
    two.scan("scope-1", for_b)
    assert two.ack(for_b).state is ImageState.COMPLETE  # while facility is down
    deadline = time.monotonic() + 30
    while two.engine.snapshot().waiting.get("facility") != 1:
        assert time.monotonic() < deadline, two.engine.snapshot()
        time.sleep(0.1)
    snapshot = two.engine.snapshot()
    assert snapshot.backends["facility"] != "ok" and snapshot.backends["lab-b"] == "ok"
    assert not [
        a
        for _, a in two.recorder.acks
        if getattr(a, "image_id", None) == for_a.image_id and isinstance(a, ImageAck)
    ]
    two.a.server.start()
    ack = two.ack(for_a)
    assert ack.state is ImageState.COMPLETE and "facility" in ack.locations


def test_an_image_no_route_matches_fails_with_the_reason(two: TwoTargets) -> None:
    stray = unique_manifest(project="Facility scans")
    two.scan("microscope-9", stray)  # matches no pattern: not scope-*
    ack = two.ack(stray)
    assert ack.state is ImageState.FAILED and ack.reason is ReasonCode.STORAGE_FAILED
    assert ack.detail and "no OMERO route for device microscope-9" in ack.detail
    assert two.a.server.images() == [] and two.b.server.images() == []

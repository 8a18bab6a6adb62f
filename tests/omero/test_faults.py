"""Faults: OMERO down, dying mid-pyramid, sessions idling out, permissions refused.

Each follows the ingest's recovery: on TransientError it aborts the writer, waits, opens a
new one and feeds every staged tile again. The stand-in's hooks (stop/start, crash after N
setTile calls, forbidden creation, read-only users, short idle timeouts) make the faults;
on a real server (TILEBRIDGE_OMERO_HOST) these tests skip.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("omero")

import omero

from tests.omero.helpers import (
    DEVICE,
    digest,
    expected_pixels,
    images_of,
    settings_for,
    standin,
    unique_manifest,
)
from tests.omero_standin_tests.helpers import create_image
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.base import ImageWriter, StoredImage
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.provenance import image_description
from tilebridge_storage.omero_backend.settings import DevicePolicy, OmeroSettings
from tilebridge_storage.testing.manifests import make_tiles

IDLE_S = 1.5


def feed(writer: ImageWriter, manifest: OpenManifest, tiles: Any) -> StoredImage:
    for key in manifest.tile_keys():
        writer.write_tile(key, tiles[key])
    return writer.finish()


def assert_one_complete_image(server: Any, manifest: OpenManifest, tiles: Any) -> int:
    """Exactly one OMERO image exists (no orphan, no duplicate), whole and right."""
    images = server.images()
    assert len(images) == 1, [i.getName().getValue() for i in images]
    image_id: int = images[0].getId().getValue()
    assert [link.child_id for link in server.links("DatasetImageLink")] == [image_id]
    assert server.pixel_state(image_id) in ("complete", "romio")
    assert digest(server.pixels(image_id)) == digest(expected_pixels(manifest, tiles))
    return image_id


def test_omero_down_at_open_is_transient_and_a_new_writer_succeeds(omero_target: Any) -> None:
    server = standin(omero_target)
    backend = OmeroBackend(settings_for(omero_target))
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    try:
        server.stop()
        with pytest.raises(TransientError, match="unreachable"):
            backend.open_image(DEVICE, manifest)
        server.start()
        stored = feed(backend.open_image(DEVICE, manifest), manifest, tiles)
        assert assert_one_complete_image(server, manifest, tiles) == stored.ids["image"]
    finally:
        backend.close()


def test_omero_dying_mid_pyramid_is_transient_and_the_retry_leaves_one_whole_image(
    omero_standin_factory: Any,
) -> None:
    target = omero_standin_factory(pyramid_threshold_px=50 * 50, pyramid_tile=(32, 16))
    server = target.server
    backend = OmeroBackend(settings_for(target))
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    try:
        writer = backend.open_image(DEVICE, manifest)
        first_id = writer.image_ids[0]  # type: ignore[attr-defined]
        server.faults.stop_after_set_tiles = 5
        with pytest.raises(TransientError):
            feed(writer, manifest, tiles)
        # the writer stays failed until the ingest aborts it
        with pytest.raises(TransientError, match="earlier OMERO call"):
            writer.write_tile(manifest.tile_keys()[0], tiles[manifest.tile_keys()[0]])
        writer.abort()  # the server is down: the broken image cannot be deleted yet
        assert server.pixel_state(first_id) == "broken"
        server.start()

        stored = feed(backend.open_image(DEVICE, manifest), manifest, tiles)
        assert stored.ids["image"] != first_id
        assert assert_one_complete_image(server, manifest, tiles) == stored.ids["image"]
        assert server.pixel_state(stored.ids["image"]) == "complete"
    finally:
        backend.close()


def test_an_ingest_crash_leaves_nothing_behind_after_the_restart(omero_target: Any) -> None:
    """The old process never aborted; a new backend (a restarted ingest) cleans up."""
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    crashed = OmeroBackend(settings_for(omero_target))
    writer = crashed.open_image(DEVICE, manifest)
    for key in manifest.tile_keys()[:3]:
        writer.write_tile(key, tiles[key])
    # ... and an image created just before a crash, before anything was linked to it
    conn = omero_target.connect()
    orphan, _ = create_image(conn, (1, 1, 1, 8, 8), np.uint8, "orphan")
    image = conn.c.sf.getQueryService().get("Image", orphan)
    image.setDescription(omero.rtypes.rstring(image_description(manifest.image_id)))
    conn.c.sf.getUpdateService().saveObject(image)

    restarted = OmeroBackend(settings_for(omero_target))
    try:
        stored = feed(restarted.open_image(DEVICE, manifest), manifest, tiles)
        assert images_of(omero_target.connect(), manifest) == [stored.ids["image"]]
        server = standin(omero_target)
        assert assert_one_complete_image(server, manifest, tiles) == stored.ids["image"]
    finally:
        restarted.close()
        crashed.close()


def test_a_finished_image_is_replaced_not_duplicated_when_stored_again(
    omero_target: Any,
) -> None:
    """A crash between finish() and the ledger entry makes the ingest store it again."""
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    backend = OmeroBackend(settings_for(omero_target))
    try:
        first = feed(backend.open_image(DEVICE, manifest), manifest, tiles)
        second = feed(backend.open_image(DEVICE, manifest), manifest, tiles)
        assert images_of(omero_target.connect(), manifest) == [second.ids["image"]]
        assert second.ids["image"] != first.ids["image"]
    finally:
        backend.close()


def test_keep_alive_carries_a_writer_over_a_long_idle_wait(omero_standin_factory: Any) -> None:
    target = omero_standin_factory(idle_timeout_s=IDLE_S)
    backend = OmeroBackend(settings_for(target, keepalive_s=IDLE_S / 4))
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    try:
        writer = backend.open_image(DEVICE, manifest)
        keys = manifest.tile_keys()
        writer.write_tile(keys[0], tiles[keys[0]])
        time.sleep(IDLE_S * 2)  # the acquisition pauses longer than the server's idle timeout
        feed(writer, manifest, tiles)
        assert_one_complete_image(target.server, manifest, tiles)
    finally:
        backend.close()


def test_without_keep_alive_an_expired_session_is_transient_and_the_retry_logs_in_again(
    omero_standin_factory: Any,
) -> None:
    target = omero_standin_factory(idle_timeout_s=IDLE_S)
    backend = OmeroBackend(settings_for(target, keepalive_s=None))
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    try:
        writer = backend.open_image(DEVICE, manifest)
        time.sleep(IDLE_S * 2)
        with pytest.raises(TransientError, match="Session"):
            feed(writer, manifest, tiles)
        writer.abort()
        feed(backend.open_image(DEVICE, manifest), manifest, tiles)
        assert_one_complete_image(target.server, manifest, tiles)
    finally:
        backend.close()


def test_forbidden_creation_is_permanent_with_the_servers_reason(omero_target: Any) -> None:
    server = standin(omero_target)
    server.faults.forbid_create.update({"Project", "Dataset"})
    backend = OmeroBackend(settings_for(omero_target))
    try:
        with pytest.raises(PermanentError, match=r"permission denied: .*create Project"):
            backend.open_image(DEVICE, unique_manifest())
        assert server.projects() == [] and server.images() == []
    finally:
        backend.close()


def test_a_read_only_user_is_refused_permanently_and_leaves_nothing(omero_target: Any) -> None:
    server = standin(omero_target)
    manifest = unique_manifest()
    backend = OmeroBackend(settings_for(omero_target))
    try:
        # the project and dataset exist (made while the user could still write)
        feed(backend.open_image(DEVICE, manifest), manifest, make_tiles(manifest))
        server.set_read_only(omero_target.username)
        again = unique_manifest(image_name="again")
        with pytest.raises(PermanentError, match=r"permission denied: .*read-only"):
            backend.open_image(DEVICE, again)
        assert len(server.images()) == 1
    finally:
        backend.close()


def test_losing_write_permission_mid_image_is_permanent(omero_target: Any) -> None:
    server = standin(omero_target)
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    backend = OmeroBackend(settings_for(omero_target))
    try:
        writer = backend.open_image(DEVICE, manifest)
        server.set_read_only(omero_target.username)
        with pytest.raises(PermanentError, match="read-only"):
            feed(writer, manifest, tiles)
        # the writer stays failed, and says so with the same kind of error
        last = manifest.tile_keys()[-1]
        with pytest.raises(PermanentError, match="earlier OMERO call"):
            writer.write_tile(last, tiles[last])
        writer.abort()
    finally:
        backend.close()


def test_a_wrong_password_is_permanent(omero_target: Any) -> None:
    backend = OmeroBackend(settings_for(omero_target, password="not-the-password"))
    with pytest.raises(PermanentError, match="login refused"):
        backend.open_image(DEVICE, unique_manifest())


def test_a_server_that_never_answers_times_out_as_transient() -> None:
    """A host that accepts TCP but never speaks Ice (hung server, wrong port)."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        settings = OmeroSettings(
            host="127.0.0.1",
            port=mute.getsockname()[1],
            username="ingest",
            password="irrelevant",
            default_policy=DevicePolicy(),
            connect_timeout_s=0.3,
        )
        backend = OmeroBackend(settings)
        with pytest.raises(TransientError, match="OMERO login of ingest"):
            backend.open_image(DEVICE, unique_manifest())
        backend.close()


def test_a_call_slower_than_call_timeout_is_transient(
    omero_target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin(omero_target)
    from tests.omero_standin.services.query import IQuery

    answer = IQuery.findAllByQuery_async
    stalled = threading.Event()

    def stall(self: Any, cb: Any, *args: Any) -> None:
        stalled.wait(10)  # the server hangs until the test lets it go
        answer(self, cb, *args)

    monkeypatch.setattr(IQuery, "findAllByQuery_async", stall)
    backend = OmeroBackend(settings_for(omero_target, call_timeout_s=0.5))
    manifest = unique_manifest()
    tiles = make_tiles(manifest)
    try:
        with pytest.raises(TransientError, match="InvocationTimeoutException"):
            backend.open_image(DEVICE, manifest)
        stalled.set()
        monkeypatch.setattr(IQuery, "findAllByQuery_async", answer)
        feed(backend.open_image(DEVICE, manifest), manifest, tiles)
        assert_one_complete_image(omero_target.server, manifest, tiles)
    finally:
        stalled.set()
        backend.close()

"""Sessions that idle out, a server that goes away and comes back, a death mid-pyramid."""

import time

import pytest

pytest.importorskip("omero")

import Ice
import numpy as np
import omero

from .helpers import (
    create_image,
    digest,
    new_project,
    open_store,
    pyramid_order,
    write_stripes,
    write_tiles,
)

IDLE_S = 2.0


def test_an_idle_session_expires_like_on_a_real_server(omero_standin_factory):
    target = omero_standin_factory(idle_timeout_s=IDLE_S)
    query = target.connect().c.sf.getQueryService()
    query.findByString("PixelsType", "value", "uint8")
    time.sleep(IDLE_S + 1.0)
    with pytest.raises(omero.SessionTimeoutException):
        query.findByString("PixelsType", "value", "uint8")
    with pytest.raises(omero.RemovedSessionException):
        query.findByString("PixelsType", "value", "uint8")


def test_keepalive_keeps_an_idle_session(omero_standin_factory):
    target = omero_standin_factory(idle_timeout_s=IDLE_S)
    conn = target.connect()
    query = conn.c.sf.getQueryService()
    # What a writer does while it waits for tiles (omero.client's own keep-alive thread,
    # client.enableKeepAlive(seconds), sends the same sf.keepAlive but takes 5 s at least).
    for _ in range(4):
        time.sleep(IDLE_S / 2)
        assert conn.keepAlive()
    assert query.findByString("PixelsType", "value", "uint8").value.val == "uint8"


def test_stop_refuses_clients_and_start_brings_the_same_data_back(omero_standin):
    server = omero_standin.server
    conn = omero_standin.connect()
    project = new_project(conn, "survives")
    arr = np.arange(2 * 30 * 20, dtype=np.uint16).reshape(1, 2, 1, 30, 20)
    image_id, pixels_id = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, pixels_id)
    write_stripes(rps, arr)
    rps.close()
    port = server.port

    server.stop()
    with pytest.raises(Ice.SocketException):
        conn.c.sf.getQueryService().get("Project", project.id.val)
    server.start()

    assert server.port == port
    again = omero_standin.connect()
    assert again.c.sf.getQueryService().get("Project", project.id.val).name.val == "survives"
    assert digest(server.pixels(image_id)) == digest(arr)


def test_a_server_death_mid_pyramid_leaves_an_image_that_must_be_rewritten(omero_standin_factory):
    target = omero_standin_factory(pyramid_threshold_px=500 * 500)
    server = target.server
    conn = target.connect()
    arr = np.random.default_rng(3).integers(0, 255, size=(1, 1, 1, 600, 600), dtype=np.uint8)
    image_id, pixels_id = create_image(conn, arr.shape, arr.dtype)
    order = pyramid_order(arr, (256, 256))
    server.faults.stop_after_set_tiles = 4
    rps = open_store(conn, pixels_id)
    write_tiles(rps, arr, order[:4])
    with pytest.raises(Ice.SocketException):
        write_tiles(rps, arr, order[4:])
    server.start()

    conn = target.connect()
    assert server.pixel_state(image_id) == "broken"
    with pytest.raises(omero.ApiUsageException, match="read-only"):
        write_tiles(open_store(conn, pixels_id), arr, order[:1])
    with pytest.raises(omero.MissingPyramidException):
        open_store(conn, pixels_id).getTile(0, 0, 0, 0, 0, 8, 8)

    # the way out: a new image, written in one pass
    new_id, new_pixels = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, new_pixels)
    write_tiles(rps, arr, order)
    rps.close()
    assert server.pixel_state(new_id) == "complete"
    assert digest(server.pixels(new_id)) == digest(arr)

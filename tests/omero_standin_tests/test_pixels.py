"""Pixel writing: what round-trips, and which of OMERO's rules refuse what."""

import pytest

pytest.importorskip("omero")

import Ice
import numpy as np
import omero

from .helpers import (
    big_endian,
    create_image,
    digest,
    open_store,
    pyramid_order,
    read_tiles,
    write_stripes,
    write_tiles,
)

rng = np.random.default_rng(7)
NON_TILE = r"Non-tile based writing unsupported\."


def _small(shape=(2, 2, 3, 300, 200), dtype=np.uint16):
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


def test_small_image_in_full_width_stripes_round_trips(omero_standin):
    conn = omero_standin.connect()
    arr = _small()
    image_id, pixels_id = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, pixels_id)
    assert not rps.requiresPixelsPyramid()
    # ROMIO tile: full width, as many rows as fit in 1 MiB
    assert rps.getTileSize() == [200, 300]
    write_stripes(rps, arr)
    rps.save()
    rps.close()

    assert digest(omero_standin.server.pixels(image_id)) == digest(arr)
    reader = open_store(conn, pixels_id)
    assert digest(read_tiles(reader, arr.shape, arr.dtype)) == digest(arr)
    plane = np.frombuffer(reader.getPlane(1, 1, 0), np.dtype(">u2")).reshape(300, 200)
    assert np.array_equal(plane, arr[0, 1, 1])
    reader.close()


def test_romio_tile_height_follows_the_one_mib_budget(omero_standin):
    conn = omero_standin.connect()
    _, pixels_id = create_image(conn, (1, 1, 1, 3000, 3000), np.uint16)
    rps = open_store(conn, pixels_id)
    assert rps.getTileSize() == [3000, 1048576 // 2 // 3000]


def test_pyramid_written_in_one_pass_round_trips(omero_standin):
    conn = omero_standin.connect()
    arr = rng.integers(0, 65535, size=(1, 1, 1, 3300, 4000), dtype=np.uint16)
    image_id, pixels_id = create_image(conn, arr.shape, arr.dtype, "big")
    rps = open_store(conn, pixels_id)
    assert rps.requiresPixelsPyramid()
    assert rps.getTileSize() == [256, 256]
    write_tiles(rps, arr, pyramid_order(arr, (256, 256)))
    rps.close()

    server = omero_standin.server
    assert server.pixel_state(image_id) == "complete"
    assert digest(server.pixels(image_id)) == digest(arr)
    reader = open_store(conn, pixels_id)
    assert digest(read_tiles(reader, arr.shape, arr.dtype)) == digest(arr)


def _pyramid_store(target, shape=(1, 2, 2, 600, 520)):
    conn = target.connect()
    arr = rng.integers(0, 255, size=shape, dtype=np.uint8)
    image_id, pixels_id = create_image(conn, arr.shape, arr.dtype)
    return conn, arr, image_id, pixels_id, open_store(conn, pixels_id)


@pytest.fixture
def small_pyramids(omero_standin_factory):
    # A low threshold keeps pyramid tests fast; the rules are the same.
    return omero_standin_factory(pyramid_threshold_px=500 * 500)


def test_pyramid_accepts_planes_in_xyzct_order_across_z_c(small_pyramids):
    _, arr, image_id, _, rps = _pyramid_store(small_pyramids)
    write_tiles(rps, arr, pyramid_order(arr, (256, 256)))
    rps.save()
    assert small_pyramids.server.pixel_state(image_id) == "complete"
    assert digest(small_pyramids.server.pixels(image_id)) == digest(arr)


def test_out_of_order_pyramid_tiles_fail_and_the_pass_is_lost(small_pyramids):
    conn, arr, image_id, pixels_id, rps = _pyramid_store(small_pyramids)
    order = pyramid_order(arr, (256, 256))
    write_tiles(rps, arr, order[:2])
    with pytest.raises(omero.ApiUsageException, match="one pass"):
        write_tiles(rps, arr, [order[3]])
    assert small_pyramids.server.pixel_state(image_id) == "broken"
    with pytest.raises(omero.ApiUsageException, match="read-only"):
        write_tiles(open_store(conn, pixels_id), arr, order[:1])


def test_planes_in_c_before_z_order_are_refused(small_pyramids):
    _, arr, _, _, rps = _pyramid_store(small_pyramids)
    order = pyramid_order(arr, (256, 256))
    per_plane = len(order) // 4
    write_tiles(rps, arr, order[:per_plane])
    z0_c1 = next(o for o in order if o[:3] == (0, 1, 0))
    with pytest.raises(omero.ApiUsageException):
        write_tiles(rps, arr, [z0_c1])


def test_wrong_tile_geometry_is_refused(small_pyramids):
    _, arr, _, _, rps = _pyramid_store(small_pyramids)
    with pytest.raises(omero.ApiUsageException):
        rps.setTile(big_endian(arr[0, 0, 0, :128, :128]), 0, 0, 0, 0, 0, 128, 128)


def test_non_tile_writes_on_a_pyramid_fail_like_the_server(small_pyramids):
    _, arr, _, _, rps = _pyramid_store(small_pyramids)
    with pytest.raises(omero.InternalException, match=NON_TILE):
        rps.setPlane(big_endian(arr[0, 0, 0]), 0, 0, 0)
    with pytest.raises(omero.InternalException, match=NON_TILE):
        rps.setRow(big_endian(arr[0, 0, 0, 0]), 0, 0, 0, 0)
    with pytest.raises(omero.InternalException, match=NON_TILE):
        rps.setRegion(10, 0, b"\0" * 10)


def test_a_pyramid_cannot_be_read_before_its_pass_completes(small_pyramids):
    _, arr, image_id, _, rps = _pyramid_store(small_pyramids)
    write_tiles(rps, arr, pyramid_order(arr, (256, 256))[:3])
    with pytest.raises(omero.MissingPyramidException):
        rps.getTile(0, 0, 0, 0, 0, 16, 16)
    # that read ended writing: the rest of the pass is refused and the image is lost
    with pytest.raises(omero.ApiUsageException, match="read-only"):
        write_tiles(rps, arr, pyramid_order(arr, (256, 256))[3:4])
    assert small_pyramids.server.pixel_state(image_id) == "broken"


def test_writes_after_close_or_save_fail(omero_standin):
    conn = omero_standin.connect()
    arr = _small((1, 1, 1, 40, 30), np.uint8)
    _, pixels_id = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, pixels_id)
    rps.setPlane(big_endian(arr[0, 0, 0]), 0, 0, 0)
    rps.save()
    with pytest.raises(omero.ApiUsageException, match="read-only"):
        rps.setPlane(big_endian(arr[0, 0, 0]), 0, 0, 0)
    rps.close()
    with pytest.raises(Ice.ObjectNotExistException):
        rps.setPlane(big_endian(arr[0, 0, 0]), 0, 0, 0)


def test_a_read_ends_writing_on_a_small_image_too(omero_standin):
    conn = omero_standin.connect()
    arr = _small((1, 1, 1, 40, 30), np.uint8)
    _, pixels_id = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, pixels_id)
    rps.getPlane(0, 0, 0)
    with pytest.raises(omero.ApiUsageException, match="read-only"):
        rps.setPlane(big_endian(arr[0, 0, 0]), 0, 0, 0)


def test_small_images_take_only_full_width_stripes(omero_standin):
    conn = omero_standin.connect()
    arr = _small((1, 1, 1, 40, 30), np.uint8)
    _, pixels_id = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, pixels_id)
    with pytest.raises(omero.InternalException, match="full-width"):
        rps.setTile(big_endian(arr[0, 0, 0, :10, :15]), 0, 0, 0, 0, 0, 15, 10)
    with pytest.raises(omero.InternalException, match="full-width"):
        rps.setTile(big_endian(arr[0, 0, 0, :10, 5:]), 0, 0, 0, 5, 0, 25, 10)
    rps.setTile(big_endian(arr[0, 0, 0, 10:20]), 0, 0, 0, 0, 10, 30, 10)


def test_little_endian_buffers_come_out_byte_swapped(omero_standin):
    conn = omero_standin.connect()
    arr = np.arange(12, dtype=np.uint16).reshape(1, 1, 1, 3, 4) + 1
    image_id, pixels_id = create_image(conn, arr.shape, arr.dtype)
    rps = open_store(conn, pixels_id)
    rps.setPlane(arr.astype("<u2").tobytes(), 0, 0, 0)
    rps.close()
    assert np.array_equal(omero_standin.server.pixels(image_id), arr.byteswap())


def test_a_message_above_64_mib_is_refused_by_ice(omero_standin):
    conn = omero_standin.connect()
    image_id, pixels_id = create_image(conn, (1, 1, 1, 3000, 3000), np.float64)  # 72 MB plane
    rps = open_store(conn, pixels_id)
    plane = np.ones((3000, 3000), dtype=np.float64)
    with pytest.raises(Ice.LocalException):
        rps.setPlane(big_endian(plane), 0, 0, 0)
    assert not omero_standin.server.pixels(image_id).any()

"""Logging in with the unmodified omero-py client."""

import pytest

pytest.importorskip("omero")

import Glacier2
from omero.gateway import BlitzGateway


def test_blitzgateway_connects_and_knows_the_user(omero_standin):
    conn = omero_standin.connect()
    ctx = conn.getEventContext()
    assert ctx.userName == omero_standin.username
    assert ctx.groupName == omero_standin.group
    # BlitzGateway logs in over ssl, then moves to the insecure router the server names.
    assert f"-p {omero_standin.server.tcp_port}" in str(conn.c.getRouter(conn.c.getCommunicator()))


def test_wrong_password_is_refused_like_glacier2_does(omero_standin):
    conn = BlitzGateway(
        omero_standin.username, "wrong", host=omero_standin.host, port=omero_standin.port
    )
    try:
        assert not conn.connect()
        assert isinstance(conn.getLastError(), Glacier2.PermissionDeniedException)
    finally:
        conn.close()


def test_unknown_user_is_refused(omero_standin):
    with pytest.raises(ConnectionError, match="PermissionDenied"):
        omero_standin.connect("nobody", "pw")

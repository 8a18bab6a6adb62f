"""pytest fixtures: ``omero_standin``, ``omero_standin_factory`` and ``omero_target``.

Use from a conftest.py::

    from tests.omero_standin.fixtures import omero_standin, omero_standin_factory, omero_target

``omero_target`` is what backend tests should take: connection settings of a real server when
``TILEBRIDGE_OMERO_HOST`` is set (with ``TILEBRIDGE_OMERO_PORT`` (default 4064),
``TILEBRIDGE_OMERO_USER``, ``TILEBRIDGE_OMERO_PASSWORD``, ``TILEBRIDGE_OMERO_GROUP``), else of a
fresh stand-in. ``target.server`` is None for a real server, so tests that need the stand-in's
fault hooks or data accessors skip there (or take ``omero_standin`` directly).
Nothing here imports omero at import time: without omero-py the fixtures skip.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest


def import_omero_quietly() -> None:
    """Import Ice/omero-py once with their import-time DeprecationWarnings silenced.

    zeroc-ice 3.6 imports the `imp` module; under the project's ``filterwarnings = error`` that
    would fail collection. Later imports hit sys.modules and warn no more.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        try:
            import Ice  # noqa: F401
            import omero.callbacks
            import omero.clients
            import omero.gateway
            import omero.util.tiles  # noqa: F401
        except ImportError:
            pass


@dataclass
class OmeroTarget:
    """Where to log in; ``server`` is the stand-in, or None for a real server."""

    host: str
    port: int
    username: str
    password: str
    group: str
    server: Any = None
    _opened: list[Any] = field(default_factory=list, repr=False)

    def connect(self, username: str | None = None, password: str | None = None) -> Any:
        """A connected BlitzGateway, closed when the test ends."""
        from omero.gateway import BlitzGateway

        conn = BlitzGateway(
            username or self.username, password or self.password, host=self.host, port=self.port
        )
        self._opened.append(conn)
        if not conn.connect():
            raise ConnectionError(f"OMERO login failed: {conn.getLastError()!r}")
        return conn

    def close_all(self) -> None:
        for conn in self._opened:
            # best effort at teardown: the server may be gone already
            with contextlib.suppress(Exception):
                conn.close()
        self._opened.clear()


def _standin_target(server: Any) -> OmeroTarget:
    user = next(iter(server.users.values()))
    return OmeroTarget(server.host, server.port, user.name, user.password, user.group, server)


@pytest.fixture
def omero_standin_factory() -> Iterator[Callable[..., OmeroTarget]]:
    """Make stand-ins with non-default settings, e.g. ``factory(idle_timeout_s=2)``.

    Keyword arguments go to OmeroStandin (users, idle_timeout_s, pyramid_threshold_px,
    pyramid_tile, message_size_max_kb). Each is started, and closed at teardown.
    """
    pytest.importorskip("omero")
    import_omero_quietly()
    from .server import OmeroStandin

    made: list[tuple[Any, OmeroTarget]] = []

    def make(**kwargs: Any) -> OmeroTarget:
        server = OmeroStandin(**kwargs)
        server.start()
        target = _standin_target(server)
        made.append((server, target))
        return target

    yield make
    for server, target in made:
        target.close_all()
        server.close()


@pytest.fixture
def omero_standin(omero_standin_factory: Callable[..., OmeroTarget]) -> OmeroTarget:
    """A fresh stand-in with default settings (one user, 600 s idle timeout)."""
    return omero_standin_factory()


@pytest.fixture
def omero_target(omero_standin_factory: Callable[..., OmeroTarget]) -> Iterator[OmeroTarget]:
    """A real OMERO server if TILEBRIDGE_OMERO_HOST is set, else a stand-in."""
    host = os.environ.get("TILEBRIDGE_OMERO_HOST")
    if not host:
        yield omero_standin_factory()
        return
    pytest.importorskip("omero")
    import_omero_quietly()
    target = OmeroTarget(
        host=host,
        port=int(os.environ.get("TILEBRIDGE_OMERO_PORT", "4064")),
        username=os.environ.get("TILEBRIDGE_OMERO_USER", ""),
        password=os.environ.get("TILEBRIDGE_OMERO_PASSWORD", ""),
        group=os.environ.get("TILEBRIDGE_OMERO_GROUP", ""),
    )
    yield target
    target.close_all()

"""The Glacier2 router and the gate every routed call passes.

omero.client talks to OMERO only through ``OMERO.Glacier2/router``: it logs in with
``createSession`` and then sends every call to the router's client endpoints. The stand-in is
its own router: ``getClientProxy`` names the stand-in's own endpoint, so routed calls arrive
here with their real identities and the ServantLocator below dispatches them -- after doing
what Glacier2 does: refuse connections without a session (Ice.ObjectNotExistException).
Sessions that idled out are refused by each servant's gate() (services/base.py) with
omero.SessionTimeoutException, then omero.RemovedSessionException, as blitz does.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import Glacier2
import Ice

from .amd import servant
from .sessions import OmeroSession

if TYPE_CHECKING:
    from .server import OmeroStandin

ROUTER_IDENTITY = Ice.Identity("router", "OMERO.Glacier2")


@dataclass(eq=False)
class GlacierSession:
    """One client connection's login; several may share one OMERO session (joins)."""

    category: str
    omero: OmeroSession
    connection: Any
    close_on_destroy: bool = False
    servants: dict[str, Any] = field(default_factory=dict)  # identity name -> servant


class GlacierRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_connection: dict[Any, GlacierSession] = {}
        self._counter = itertools.count(1)

    @staticmethod
    def _key(connection: Any) -> Any:
        # IcePy wraps the same connection in a new object per call; its string names both
        # socket ends, which is unique while the connection is open.
        return connection.toString() if connection is not None else None

    def new_category(self) -> str:
        return f"standin-{next(self._counter)}"

    def add(self, session: GlacierSession) -> None:
        with self._lock:
            self._by_connection[self._key(session.connection)] = session

    def for_connection(self, connection: Any) -> GlacierSession | None:
        with self._lock:
            return self._by_connection.get(self._key(connection))

    def remove(self, session: GlacierSession) -> None:
        with self._lock:
            key = self._key(session.connection)
            if self._by_connection.get(key) is session:
                del self._by_connection[key]

    def all(self) -> list[GlacierSession]:
        with self._lock:
            return list(self._by_connection.values())


class _ConnectionClosed(Ice.ConnectionCallback):
    """Glacier2 destroys a client's session when its connection goes away."""

    def __init__(self, server: OmeroStandin, session: GlacierSession) -> None:
        self.server = server
        self.session = session

    def heartbeat(self, con: Any) -> None:
        pass

    def closed(self, con: Any) -> None:
        self.server.destroy_glacier_session(self.session)


@servant
class Router(Glacier2.Router):
    def __init__(self, server: OmeroStandin) -> None:
        self.server = server

    def _own_endpoint(self, current: Any) -> Any:
        # Routed calls must come back on the transport the client logged in with.
        prx = current.adapter.createDirectProxy(Ice.Identity("client", "OMERO.Glacier2"))
        transport = current.con.type() if current.con is not None else "tcp"
        same = [e for e in prx.ice_getEndpoints() if _transport(e) == transport]
        return prx.ice_endpoints(same or prx.ice_getEndpoints())

    def getClientProxy(self, current: Any = None) -> Any:
        return self._own_endpoint(current)

    def getServerProxy(self, current: Any = None) -> Any:
        return self._own_endpoint(current)

    def addProxies(self, proxies: Any, current: Any = None) -> list[Any]:
        return []

    def getCategoryForClient(self, current: Any = None) -> str:
        session = self.server.glaciers.for_connection(current.con)
        if session is None:
            raise Glacier2.SessionNotExistException()
        return session.category

    def createSession(self, userId: str, password: str, current: Any = None) -> Any:
        return self.server.login(userId, password, current)

    def createSessionFromSecureConnection(self, current: Any = None) -> Any:
        raise Glacier2.PermissionDeniedException(reason="certificate login is not supported")

    def refreshSession(self, current: Any = None) -> None:
        session = self.server.glaciers.for_connection(current.con)
        if session is None:
            raise Glacier2.SessionNotExistException()

    def destroySession(self, current: Any = None) -> None:
        session = self.server.glaciers.for_connection(current.con)
        if session is None:
            raise Glacier2.SessionNotExistException()
        self.server.destroy_glacier_session(session)

    def getSessionTimeout(self, current: Any = None) -> int:
        return int(self.server.sessions.idle_timeout_s)

    def getACMTimeout(self, current: Any = None) -> int:
        return 0


def _transport(endpoint: Any) -> str:
    return "ssl" if endpoint.getInfo().secure() else "tcp"


class SessionGate(Ice.ServantLocator):
    """Finds the servant for a routed call, refusing what Glacier2/blitz would refuse."""

    def __init__(self, server: OmeroStandin) -> None:
        self.server = server

    def locate(self, current: Any) -> Any:
        server = self.server
        not_found = Ice.ObjectNotExistException(
            id=current.id, facet=current.facet, operation=current.operation
        )
        if server.crashed:
            # The process "died": drop the connection instead of answering.
            current.con.close(True)
            raise not_found
        session = server.glaciers.for_connection(current.con)
        if session is None or session.category != current.id.category:
            raise not_found
        target = session.servants.get(current.id.name)
        if target is None:
            raise not_found
        return target

    def finished(self, current: Any, servant: Any, cookie: Any) -> None:
        pass

    def deactivate(self, category: str) -> None:
        pass


def attach_close_callback(server: OmeroStandin, session: GlacierSession) -> None:
    try:
        session.connection.setCallback(_ConnectionClosed(server, session))
    except Ice.Exception:
        # Already closed: the session dies with it.
        server.destroy_glacier_session(session)

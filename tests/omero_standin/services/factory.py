"""omero.api.ServiceFactory: the session object createSession hands to the client."""

from __future__ import annotations

import itertools
from typing import Any

import omero
import omero.api
import omero.model

from ..amd import servant
from .base import Service

_store_numbers = itertools.count(1)


@servant
class ServiceFactory(omero.api.ServiceFactory, Service):
    # name under which each stateless service is registered -> (servant class, proxy class)
    STATELESS: dict[str, tuple[str, Any]] = {
        "getAdminService": ("IAdmin", omero.api.IAdminPrx),
        "getConfigService": ("IConfig", omero.api.IConfigPrx),
        "getQueryService": ("IQuery", omero.api.IQueryPrx),
        "getUpdateService": ("IUpdate", omero.api.IUpdatePrx),
        "getPixelsService": ("IPixels", omero.api.IPixelsPrx),
        "getContainerService": ("IContainer", omero.api.IContainerPrx),
        "getSessionService": ("ISession", omero.api.ISessionPrx),
    }

    def __init__(self, server: Any, session: Any) -> None:
        omero.api.ServiceFactory.__init__(self)
        Service.__init__(self, server, session)

    def _proxy(self, name: str, current: Any) -> Any:
        identity = current.id.__class__(name, self.session.category)
        return current.adapter.createProxy(identity)

    def _stateless(self, getter: str, current: Any) -> Any:
        name, prx_class = self.STATELESS[getter]
        if name not in self.session.servants:
            self.session.servants[name] = self.server.make_service(name, self.session)
        return prx_class.uncheckedCast(self._proxy(name, current))

    def getAdminService(self, current: Any = None) -> Any:
        return self._stateless("getAdminService", current)

    def getConfigService(self, current: Any = None) -> Any:
        return self._stateless("getConfigService", current)

    def getQueryService(self, current: Any = None) -> Any:
        return self._stateless("getQueryService", current)

    def getUpdateService(self, current: Any = None) -> Any:
        return self._stateless("getUpdateService", current)

    def getPixelsService(self, current: Any = None) -> Any:
        return self._stateless("getPixelsService", current)

    def getContainerService(self, current: Any = None) -> Any:
        return self._stateless("getContainerService", current)

    def getSessionService(self, current: Any = None) -> Any:
        return self._stateless("getSessionService", current)

    def createRawPixelsStore(self, current: Any = None) -> Any:
        from ..pixels_store import RawPixelsStore

        name = f"RawPixelsStore-{next(_store_numbers)}"
        self.session.servants[name] = RawPixelsStore(self.server, self.session, name)
        return omero.api.RawPixelsStorePrx.uncheckedCast(self._proxy(name, current))

    def getByName(self, name: str, current: Any = None) -> Any:
        if name not in self.session.servants:
            raise omero.ApiUsageException(message=f"no active service {name!r}")
        return self._proxy(name, current)

    def activeServices(self, current: Any = None) -> list[str]:
        return [n for n, s in self.session.servants.items() if s is not self]

    def keepAlive(self, proxy: Any, current: Any = None) -> bool:
        # The gate already refreshed the session; the proxy's servant need only exist.
        return proxy is None or proxy.ice_getIdentity().name in self.session.servants

    def keepAllAlive(self, proxies: Any, current: Any = None) -> int:
        bits = 0
        for i, prx in enumerate(proxies or []):
            if prx is not None and prx.ice_getIdentity().name not in self.session.servants:
                bits |= 1 << i
        return bits

    def getSecurityContexts(self, current: Any = None) -> list[Any]:
        return [omero.model.ExperimenterGroupI(self.user.group_id, False)]

    def setSecurityContext(self, obj: Any, current: Any = None) -> Any:
        group_id = self.user.group_id
        if not isinstance(obj, omero.model.ExperimenterGroup) or obj.id.val != group_id:
            raise omero.SecurityViolation(message=f"{self.user.name} is not a member of {obj}")
        return omero.model.ExperimenterGroupI(group_id, False)

    def setCallback(self, callback: Any, current: Any = None) -> None:
        pass  # the stand-in never calls clients back

    def subscribe(self, topicName: str, prx: Any, current: Any = None) -> None:
        pass

    def closeOnDestroy(self, current: Any = None) -> None:
        self.session.close_on_destroy = True

    def detachOnDestroy(self, current: Any = None) -> None:
        self.session.close_on_destroy = False

    def destroy(self, current: Any = None) -> None:
        self.server.destroy_glacier_session(self.session)

    def submit(self, req: Any, current: Any = None) -> Any:
        from .commands import run_request

        with self.lock:
            handle = run_request(self, req)
        name = f"Handle-{next(_store_numbers)}"
        self.session.servants[name] = handle
        return omero.cmd.HandlePrx.uncheckedCast(self._proxy(name, current))

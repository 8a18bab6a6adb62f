"""IAdmin, IConfig and ISession: what a login and the gateway's bookkeeping ask for."""

from __future__ import annotations

import re
import time
from typing import Any

import omero
import omero.api
import omero.model
from omero.rtypes import rlong, rstring, rtime

from ..amd import servant
from .base import Service


@servant
class IAdmin(omero.api.IAdmin, Service):
    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)

    def getEventContext(self, current: Any = None) -> Any:
        return self.event_context()

    def canUpdate(self, obj: Any, current: Any = None) -> bool:
        return not self.user.read_only

    def getExperimenter(self, id: int, current: Any = None) -> Any:
        return self._loaded("Experimenter", id)

    def getGroup(self, id: int, current: Any = None) -> Any:
        return self._loaded("ExperimenterGroup", id)

    def lookupExperimenter(self, name: str, current: Any = None) -> Any:
        user = self.server.users.get(name)
        if user is None:
            raise omero.ApiUsageException(message=f"No such experimenter: {name}")
        return self._loaded("Experimenter", user.id)

    def getMemberOfGroupIds(self, experimenter: Any, current: Any = None) -> list[int]:
        return [self.user.group_id]

    def getLeaderOfGroupIds(self, experimenter: Any, current: Any = None) -> list[int]:
        return []

    def getSecurityRoles(self, current: Any = None) -> Any:
        return omero.sys.Roles(
            rootId=0, rootName="root", systemGroupId=0, systemGroupName="system",
            userGroupId=1, userGroupName="user", guestId=1, guestName="guest",
            guestGroupId=2, guestGroupName="guest",
        )  # fmt: skip

    def _loaded(self, kind: str, obj_id: int) -> Any:
        obj = self.server.store.get(kind, obj_id)
        if obj is None:
            raise omero.ApiUsageException(message=f"No such {kind}: {obj_id}")
        return self.server.store.copy_out(obj)


@servant
class IConfig(omero.api.IConfig, Service):
    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)

    def _values(self) -> dict[str, str]:
        return self.server.config_values()

    def getVersion(self, current: Any = None) -> str:
        return "5.6.0-tilebridge-standin"

    def getConfigValue(self, key: str, current: Any = None) -> str:
        return self._values().get(key, "")

    def getConfigValues(self, keyRegex: str, current: Any = None) -> dict[str, str]:
        return {k: v for k, v in self._values().items() if re.search(keyRegex, k)}

    def getConfigDefaults(self, current: Any = None) -> dict[str, str]:
        return self._values()

    def getClientConfigValues(self, current: Any = None) -> dict[str, str]:
        return {k: v for k, v in self._values().items() if k.startswith("omero.client.")}

    def getClientConfigDefaults(self, current: Any = None) -> dict[str, str]:
        return self.getClientConfigValues(current)

    def getDatabaseUuid(self, current: Any = None) -> str:
        return self.server.database_uuid

    def getServerTime(self, current: Any = None) -> Any:
        return rtime(int(time.time() * 1000))

    def getDatabaseTime(self, current: Any = None) -> Any:
        return rtime(int(time.time() * 1000))


@servant
class ISession(omero.api.ISession, Service):
    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)

    def getSession(self, sessionUuid: str, current: Any = None) -> Any:
        s = self.server.sessions.get(sessionUuid)
        if s is None or s.closed:
            raise omero.RemovedSessionException(message=f"No session: {sessionUuid}")
        out = omero.model.SessionI(1, True)
        out._uuid = rstring(s.uuid)
        out._owner = omero.model.ExperimenterI(s.user.id, False)
        out._timeToIdle = rlong(int(s.idle_timeout_s * 1000))
        out._timeToLive = rlong(0)
        out._started = rtime(int(time.time() * 1000))
        out._userAgent = rstring("")
        return out

    def getReferenceCount(self, sessionUuid: str, current: Any = None) -> int:
        s = self.server.sessions.get(sessionUuid)
        return 0 if s is None or s.closed else s.references

    def closeSession(self, sess: Any, current: Any = None) -> int:
        s = self.server.sessions.get(sess.getUuid().val)
        if s is None or s.closed:
            raise omero.RemovedSessionException(message=f"No session: {sess.getUuid().val}")
        left = self.server.sessions.close(s)
        if left == 0:
            self.server.on_session_dead(s)
        return left

"""Users, groups and OMERO sessions (the server-side session, not the Glacier2 one)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import omero


@dataclass
class User:
    name: str
    password: str
    group: str = "tilebridge"
    id: int = 0
    group_id: int = 0
    # A read-only user may log in and read but every write fails with SecurityViolation,
    # like a member of a read-only group or a user whose quota/permissions forbid writing.
    read_only: bool = False


@dataclass
class OmeroSession:
    uuid: str
    user: User
    idle_timeout_s: float
    last_access: float = field(default_factory=time.monotonic)
    closed: bool = False
    # Joins (createSession with the uuid) add references; ISession.closeSession removes them.
    references: int = 1

    def touch(self) -> None:
        """Account one call; raise what a real server raises for a dead session."""
        now = time.monotonic()
        if self.closed:
            raise omero.RemovedSessionException(message=f"Session is closed: {self.uuid}")
        idle = now - self.last_access
        if idle > self.idle_timeout_s:
            # The real server reports the timeout once, then forgets the session.
            self.closed = True
            limit_ms = int(self.idle_timeout_s * 1000)
            over_ms = int((idle - self.idle_timeout_s) * 1000)
            raise omero.SessionTimeoutException(
                message=f"Session ({self.uuid}) exceeded timeToIdle ({limit_ms} ms) by {over_ms} ms"
            )
        self.last_access = now


class SessionRegistry:
    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._by_uuid: dict[str, OmeroSession] = {}

    def create(self, user: User) -> OmeroSession:
        with self._lock:
            session = OmeroSession(str(uuid.uuid4()), user, self.idle_timeout_s)
            self._by_uuid[session.uuid] = session
            return session

    def join(self, session_uuid: str) -> OmeroSession | None:
        """A live session for a uuid used as both user name and password, else None."""
        with self._lock:
            session = self._by_uuid.get(session_uuid)
        if session is None:
            return None
        try:
            session.touch()
        except omero.SessionException:
            return None
        session.references += 1
        return session

    def get(self, session_uuid: str) -> OmeroSession | None:
        with self._lock:
            return self._by_uuid.get(session_uuid)

    def close(self, session: OmeroSession) -> int:
        """Drop one reference; the session dies at zero. Returns the references left."""
        session.references = max(0, session.references - 1)
        if session.references == 0:
            session.closed = True
        return session.references

    def all(self) -> list[OmeroSession]:
        with self._lock:
            return list(self._by_uuid.values())

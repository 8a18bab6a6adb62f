"""Logins to OMERO: connect with timeouts, pick the group, keep alive, reconnect.

OMERO drops a session after ~10 minutes without calls, and an acquisition can leave a writer
waiting for tiles far longer; so every session pings the server (`sf.keepAlive`) from its
own thread every `keepalive_s`. A session that died anyway (server restart, network cut) is
noticed by the pool at the next `open_image` and replaced by a new login; a writer that was
using it fails with TransientError, and its retry rewrites from staging.

The pool holds its lock only to read and change its dictionaries, never across a call to the
server: checking a session, logging in and closing one all wait on OMERO, and a stalled
server must not hold every storer worker (closing a session of a stalled server waits for
Ice's own destroy timeout, about a minute, so it runs on a thread of its own).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import cached_property
from typing import Any

from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_storage.omero_backend._omero import omero
from tilebridge_storage.omero_backend.errors import omero_errors
from tilebridge_storage.omero_backend.settings import Credentials, OmeroSettings

log = logging.getLogger(__name__)

_DELETE_POLL_MS = 250


class OmeroSession:
    """One login (one account, one group), shared by the writers of that account."""

    def __init__(self, settings: OmeroSettings, credentials: Credentials) -> None:
        self.settings = settings
        self.username = credentials.username
        self._client: Any = None
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None
        self.user_id = 0
        self.group_id = 0
        with omero_errors(f"login of {self.username} at {settings.host}:{settings.port}"):
            try:
                self._login(credentials)
            except BaseException:
                self.close(end_session=False)
                raise
        if settings.keepalive_s is not None:
            self._pinger = threading.Thread(
                target=self._keep_alive, name=f"omero-keepalive-{self.username}", daemon=True
            )
            self._pinger.start()

    def __repr__(self) -> str:
        return f"OmeroSession({self.username}@{self.settings.host}:{self.settings.port})"

    def _login(self, credentials: Credentials) -> None:
        s = self.settings
        props = {
            "omero.host": s.host,
            "omero.port": str(s.port),
            "Ice.Override.ConnectTimeout": str(_ms(s.connect_timeout_s)),
            "Ice.Default.InvocationTimeout": str(_ms(s.call_timeout_s)),
        }
        self._client = omero.client(host=s.host, port=s.port, pmap=props)
        # The password goes straight to the router and is kept nowhere else.
        self._client.createSession(credentials.username, credentials.secret())
        self._client.getSession().detachOnDestroy()
        if not s.secure:
            # As BlitzGateway does: login over ssl, then join the session on the server's
            # insecure router (faster for pixel data); the ssl client is dropped.
            secure_client, self._client = self._client, self._client.createClient(secure=False)
            secure_client.closeSession()
            self._client.getSession().detachOnDestroy()
        ctx = self.admin.getEventContext()
        self.user_id, self.group_id = ctx.userId, ctx.groupId
        if credentials.group is not None and credentials.group != ctx.groupName:
            self.group_id = self._switch_group(credentials.group, list(ctx.memberOfGroups))

    def _switch_group(self, name: str, member_of: list[int]) -> int:
        for group_id in member_of:
            if self.admin.getGroup(group_id).getName().getValue() == name:
                self.sf.setSecurityContext(omero.model.ExperimenterGroupI(group_id, False))
                return group_id
        raise PermanentError(f"OMERO user {self.username} is not a member of group {name!r}")

    # -- services: stateless proxies, fetched once, shared by every writer of the session -
    @property
    def sf(self) -> Any:
        client = self._client
        if client is None:  # the pool closed it as lost while a writer still held it
            raise TransientError(f"the OMERO session of {self.username} was closed")
        return client.getSession()

    @cached_property
    def query(self) -> Any:
        return self.sf.getQueryService()

    @cached_property
    def update(self) -> Any:
        return self.sf.getUpdateService()

    @cached_property
    def pixels(self) -> Any:
        return self.sf.getPixelsService()

    @cached_property
    def admin(self) -> Any:
        return self.sf.getAdminService()

    def raw_pixels_store(self) -> Any:
        return self.sf.createRawPixelsStore()

    def submit(self, request: Any) -> Any:
        """Run a command (Delete2) and wait for it; raises omero.CmdError on ERR."""
        loops = max(1, math.ceil(self.settings.delete_timeout_s * 1000 / _DELETE_POLL_MS))
        client = self._client
        if client is None:
            raise TransientError(f"the OMERO session of {self.username} was closed")
        callback = client.submit(request, loops=loops, ms=_DELETE_POLL_MS)
        try:
            return callback.getResponse()
        finally:
            callback.close(True)

    # -- life ----------------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether the server still knows this session (one round trip)."""
        if self._client is None or self._stop.is_set():
            return False
        try:
            self.sf.keepAlive(None)
        except Exception:  # any failure means: log in again
            return False
        return True

    def _keep_alive(self) -> None:
        interval = self.settings.keepalive_s
        assert interval is not None
        while not self._stop.wait(interval):
            try:
                self.sf.keepAlive(None)
            except Exception as exc:  # the pool replaces a dead session at the next open
                log.info("OMERO keep-alive for %s failed: %s", self.username, type(exc).__name__)

    def close(self, end_session: bool = True) -> None:
        """Free the Ice communicator; with `end_session`, end the session on the server too
        (pointless for a session that is known to be gone)."""
        self._stop.set()
        if self._pinger is not None and self._pinger is not threading.current_thread():
            self._pinger.join(timeout=self.settings.call_timeout_s)
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if end_session and client.getSession(blocking=False) is not None:
                client.killSession()
            else:
                client.closeSession()
        except Exception as exc:  # a server that is gone cannot end it; it expires there
            log.debug("closing the OMERO session of %s: %s", self.username, type(exc).__name__)


Account = tuple[str, str | None]


class SessionPool:
    """One live session per account; a dead one is replaced by a new login on demand.

    Several workers asking at once for an account without a session wait for one login (the
    first one's), not one login each."""

    def __init__(
        self,
        settings: OmeroSettings,
        login: Callable[[OmeroSettings, Credentials], OmeroSession] = OmeroSession,
    ) -> None:
        self.settings = settings
        self._login = login
        self._lock = threading.Lock()
        self._sessions: dict[Account, OmeroSession] = {}
        self._logins: dict[Account, Future[OmeroSession]] = {}

    def session(self, credentials: Credentials) -> OmeroSession:
        account = credentials.account
        with self._lock:
            current = self._sessions.get(account)
        if current is not None:
            if current.alive():  # one round trip, without the lock
                return current
            self._drop(account, current)
        return self._shared_login(credentials)

    def _drop(self, account: Account, lost: OmeroSession) -> None:
        with self._lock:
            if self._sessions.get(account) is not lost:
                return  # another worker dropped it already
            del self._sessions[account]
        log.info("OMERO session of %s was lost; logging in again", lost.username)
        threading.Thread(
            target=lost.close, kwargs={"end_session": False},
            name=f"omero-close-{lost.username}", daemon=True,
        ).start()  # fmt: skip

    def _shared_login(self, credentials: Credentials) -> OmeroSession:
        account = credentials.account
        with self._lock:
            current = self._sessions.get(account)
            if current is not None:  # another worker logged in meanwhile
                return current
            ours = account not in self._logins
            pending = self._logins.setdefault(account, Future())
        if not ours:
            return pending.result()  # the login's own error if it failed
        try:
            fresh = self._login(self.settings, credentials)
        except BaseException as exc:
            with self._lock:
                del self._logins[account]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._logins[account]
            self._sessions[account] = fresh
        pending.set_result(fresh)
        return fresh

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))

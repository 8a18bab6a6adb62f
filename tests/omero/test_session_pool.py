"""The session pool never holds its lock across a call to OMERO (chaos finding 4: closing a
session of a stalled server waited a minute with the lock held, and every storer worker
waited behind it), and several workers share one login.

The sessions here are stand-ins for OmeroSession that block where OMERO would stall, so
each test decides exactly when a "server call" returns; one test then uses a real session
over Ice against the OMERO stand-in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from tests.omero_standin.fixtures import OmeroTarget
from tilebridge_protocol.errors import TransientError
from tilebridge_storage.omero_backend.session import OmeroSession, SessionPool
from tilebridge_storage.omero_backend.settings import Credentials, OmeroSettings

SETTINGS = OmeroSettings(host="omero.invalid", username="ingest", password="x")
ALICE = Credentials(username="alice", password="a")
BOB = Credentials(username="bob", password="b")


class StalledSession:
    """A login whose `alive` and `close` wait until the test lets them go."""

    def __init__(self, username: str) -> None:
        self.username = username
        self.is_alive = True
        self.alive_may_return = threading.Event()
        self.alive_may_return.set()
        self.close_may_return = threading.Event()
        self.closed_by: str | None = None
        self.close_started = threading.Event()

    def alive(self) -> bool:
        self.alive_may_return.wait(10)
        return self.is_alive

    def close(self, end_session: bool = True) -> None:
        self.closed_by = threading.current_thread().name
        self.close_started.set()
        self.close_may_return.wait(10)


class Logins:
    """The pool's login function: counts logins, can be held or made to fail."""

    def __init__(self) -> None:
        self.made: list[StalledSession] = []
        self.may_return = threading.Event()
        self.may_return.set()
        self.fail_next: Exception | None = None
        self._lock = threading.Lock()

    def __call__(self, settings: OmeroSettings, credentials: Credentials) -> OmeroSession:
        self.may_return.wait(10)
        with self._lock:
            if self.fail_next is not None:
                error, self.fail_next = self.fail_next, None
                raise error
            session = StalledSession(credentials.username)
            self.made.append(session)
        return cast(OmeroSession, session)


def pool_with(logins: Logins) -> SessionPool:
    return SessionPool(SETTINGS, login=cast(Callable[..., OmeroSession], logins))


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_a_lost_session_is_closed_off_the_callers_thread_and_a_new_one_is_handed_out() -> None:
    logins = Logins()
    pool = pool_with(logins)
    first = cast(StalledSession, pool.session(ALICE))
    first.is_alive = False
    # Closing it stalls (the server is stopped): the caller still gets a new session now.
    second = pool.session(ALICE)
    assert cast(object, second) is not first and len(logins.made) == 2
    assert first.close_started.wait(5)
    assert first.closed_by is not None and first.closed_by.startswith("omero-close-")
    assert first.closed_by != threading.current_thread().name
    # While that close still waits, the pool serves this account and the other one.
    assert pool.session(ALICE) is second
    assert pool.session(BOB).username == "bob"
    first.close_may_return.set()


def test_a_slow_liveness_check_of_one_account_does_not_hold_another() -> None:
    logins = Logins()
    pool = pool_with(logins)
    alice = cast(StalledSession, pool.session(ALICE))
    alice.alive_may_return.clear()  # alice's server call now hangs
    hung, answer = in_thread(lambda: pool.session(ALICE))
    assert pool.session(BOB).username == "bob"  # would block here if the lock were held
    assert hung.is_alive() and answer == []
    alice.alive_may_return.set()
    hung.join(5)
    assert answer == [alice]


def test_workers_asking_at_once_share_one_login() -> None:
    logins = Logins()
    logins.may_return.clear()
    pool = pool_with(logins)
    with ThreadPoolExecutor(max_workers=6) as workers:
        futures = [workers.submit(pool.session, ALICE) for _ in range(6)]
        logins.may_return.set()
        sessions = {id(f.result(timeout=10)) for f in futures}
    assert len(logins.made) == 1 and sessions == {id(logins.made[0])}


def test_a_failed_login_fails_its_waiters_and_the_next_request_logs_in_again() -> None:
    logins = Logins()
    logins.fail_next = TransientError("OMERO login: server unreachable")
    pool = pool_with(logins)
    with pytest.raises(TransientError, match="unreachable"):
        pool.session(ALICE)
    assert cast(object, pool.session(ALICE)) is logins.made[0]


def test_a_session_the_pool_closed_tells_its_writer_to_retry(omero_target: OmeroTarget) -> None:
    """A writer still holding a session the pool dropped gets a retryable error, not an
    AttributeError of a closed client (chaos finding 2: the image failed for good)."""
    settings = OmeroSettings(
        host=omero_target.host, port=omero_target.port,
        username=omero_target.username, password=omero_target.password,
        keepalive_s=None,
    )  # fmt: skip
    session = OmeroSession(settings, settings.credentials)
    assert session.alive()
    session.close()
    assert not session.alive()
    with pytest.raises(TransientError, match="was closed"):
        session.raw_pixels_store()
    with pytest.raises(TransientError, match="was closed"):
        session.submit(object())

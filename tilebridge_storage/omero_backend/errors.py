"""What an OMERO or Ice exception means for the ingest: retry later, or give up.

Network, timeout and session faults pass (TransientError: the next attempt reconnects and
rewrites from staging). Refusals by the server's rules (permissions, invalid requests, a
failed delete) will fail the same way again (PermanentError). Messages carry the server's
reason but never the credentials: OMERO's own messages name users, not passwords.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tilebridge_protocol.errors import PermanentError, TilebridgeError, TransientError
from tilebridge_storage.omero_backend._omero import Glacier2, Ice, omero

# Faults of the server's state that pass on their own (busy database, full disk, lock waits).
_TRANSIENT_SERVER = (omero.SessionException, omero.ConcurrencyException, omero.ResourceError)


def classify(exc: BaseException, what: str) -> TilebridgeError | None:
    """The tilebridge error for an OMERO/Ice exception, or None for anything else (bugs)."""
    if isinstance(exc, TilebridgeError):
        return exc
    if isinstance(exc, Ice.MarshalException):
        return PermanentError(f"OMERO {what}: message refused ({type(exc).__name__})")
    if isinstance(exc, Ice.LocalException):
        return TransientError(f"OMERO {what}: server unreachable or slow ({type(exc).__name__})")
    if isinstance(exc, Glacier2.PermissionDeniedException):
        return PermanentError(f"OMERO {what}: login refused ({exc.reason})")
    if isinstance(exc, Glacier2.CannotCreateSessionException):
        return TransientError(f"OMERO {what}: cannot create a session ({exc.reason})")
    if isinstance(exc, omero.WrappedCreateSessionException):
        kind = TransientError if exc.concurrency else PermanentError
        return kind(f"OMERO {what}: login failed ({exc.type}: {exc.reason})")
    if isinstance(exc, _TRANSIENT_SERVER):
        return TransientError(f"OMERO {what}: {type(exc).__name__}: {_message(exc)}")
    if isinstance(exc, omero.SecurityViolation):
        return PermanentError(f"OMERO {what}: permission denied: {_message(exc)}")
    if isinstance(exc, omero.ServerError):
        return PermanentError(f"OMERO {what}: {type(exc).__name__}: {_message(exc)}")
    if isinstance(exc, omero.CmdError):
        return PermanentError(f"OMERO {what}: the server refused: {_cmd_message(exc)}")
    if isinstance(exc, omero.ClientError):
        # omero.client's own failures, e.g. "Obtained null object proxy" after its login
        # retries all timed out: a server that did not answer in time.
        return TransientError(f"OMERO {what}: {exc}")
    return None


@contextmanager
def omero_errors(what: str) -> Iterator[None]:
    """Turn OMERO/Ice exceptions raised inside into TransientError / PermanentError."""
    try:
        yield
    except Exception as exc:
        mapped = classify(exc, what)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", "") or type(exc).__name__)


def _cmd_message(exc: BaseException) -> str:
    err = getattr(exc, "err", None)
    params = getattr(err, "parameters", None) or {}
    return str(params.get("message") or getattr(err, "name", "") or "command failed")

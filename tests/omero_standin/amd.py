"""Glue between plain Python methods and Ice 3.6 servant dispatch.

omero-py's Slice marks almost every service operation AMD, so Ice calls ``name_async(cb, ...)``
instead of ``name(...)``. Servants here implement the plain ``name(...)`` and the ``servant``
decorator adds the ``_async`` twin, so each operation is written once and reads like the API.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import Ice
import omero

log = logging.getLogger(__name__)

T = TypeVar("T", bound=type)


def _returns_nothing(fn: Callable[..., Any]) -> bool:
    # A void Slice operation must be answered with ice_response() and no argument; the
    # "-> None" annotation is how a servant method says it is void.
    annotation = inspect.signature(fn).return_annotation
    return annotation is None or annotation == "None"


def as_ice_error(exc: BaseException) -> Ice.Exception:
    """What the client should see for an exception raised inside a servant."""
    if isinstance(exc, Ice.Exception):
        return exc
    # A bug in the stand-in must not look like a rule the client broke: InternalException
    # is also what a real server sends for its own failures.
    log.error("stand-in servant failed", exc_info=exc)
    return omero.InternalException(
        serverStackTrace="".join(traceback.format_exception(exc)),
        serverExceptionClass=type(exc).__name__,
        message=f"OMERO stand-in internal error: {type(exc).__name__}: {exc}",
    )


def _gated(self: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    # A servant's gate() raises the session errors a real server gives before any work.
    # (It runs here rather than in the ServantLocator: IcePy turns a user exception raised
    # by locate() into ObjectNotExistException.)
    gate = getattr(self, "gate", None)
    if gate is not None:
        gate()
    return fn(self, *args)


def _plain_twin(fn: Callable[..., Any]) -> Callable[..., Any]:
    def dispatch(self: Any, *args: Any) -> Any:
        try:
            return _gated(self, fn, args)
        except Ice.Exception:
            raise
        except Exception as exc:
            raise as_ice_error(exc) from exc

    dispatch.__name__ = fn.__name__
    return dispatch


def _amd_twin(fn: Callable[..., Any]) -> Callable[..., None]:
    void = _returns_nothing(fn)

    def dispatch(self: Any, cb: Any, *args: Any) -> None:
        # Ice passes the Ice.Current as the last positional argument.
        lock = getattr(self, "lock", None)
        try:
            if lock is None:
                result = _gated(self, fn, args)
            else:
                with lock:
                    result = _gated(self, fn, args)
        except Exception as exc:
            cb.ice_exception(as_ice_error(exc))
            return
        if void:
            cb.ice_response()
        else:
            cb.ice_response(result)

    dispatch.__name__ = fn.__name__ + "_async"
    return dispatch


def _not_supported(op: str, amd: bool) -> Callable[..., None]:
    def refuse(self: Any, *args: Any) -> None:
        exc = omero.ApiUsageException(message=f"{op} is not supported by the OMERO stand-in")
        if amd:
            args[0].ice_exception(exc)
            return
        raise exc

    refuse.__name__ = op + ("_async" if amd else "")
    return refuse


def servant(cls: T) -> T:
    """Make a servant class dispatchable and fail loudly on what it does not implement.

    Adds ``name_async`` for every method ``name`` that a generated base declares AMD, and a
    refusing stub for every operation left out: the generated bases only ``pass``, which for an
    AMD operation would leave the client waiting forever.
    """
    generated = [b for b in cls.__mro__ if "_ice_type" in vars(b)]
    own: dict[str, Any] = {}
    for base in reversed([b for b in cls.__mro__ if b not in generated]):
        own.update(vars(base))
    for base in generated:
        for name, fn in vars(base).items():
            if name.startswith(("_", "ice_")) or not inspect.isfunction(fn):
                continue
            amd = name.endswith("_async")
            op = name[: -len("_async")] if amd else name
            if op in own and inspect.isfunction(own[op]):
                setattr(cls, name, _amd_twin(own[op]) if amd else _plain_twin(own[op]))
            elif name not in own:
                setattr(cls, name, _not_supported(op, amd))
    return cls

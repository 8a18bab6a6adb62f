"""The fast local path: the front door over a Unix-domain socket, for the acquisition
program on the same Pi (the ImSwitch adapter). Framing: `edge_agent.fastpath_client`.

Picked by the numbers (docs/benchmarks.md): a frame goes from the caller's array into the
socket and from the socket straight into the array the front door spools, with no HTTP
parsing and no intermediate copy in Python; the agent stays its own process (a crash of
the acquisition program costs nothing that was accepted). One thread per connection
(`fastpath-conn`), each receiving into buffers paid for from a shared byte budget (half of
`acquisition_memory_bytes`), so concurrent clients cannot grow the agent beyond it.
Access: whoever may connect to the socket (mode 0660) may acquire; the socket lives in a
folder the admin gives to the acquisition's group.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
from pydantic import ValidationError

from edge_agent.acquisition import Acquisition
from edge_agent.errors import ConflictError, UnknownExperimentError
from edge_agent.fastpath_client import HEADER
from edge_agent.localtargets import Budget
from edge_agent.status import Reporter
from tilebridge_protocol.errors import PermanentError, TilebridgeError, TransientError

log = logging.getLogger(__name__)

MAX_REQUEST_JSON = 1024 * 1024
MAX_CONNECTIONS = 16


def error_answer(exc: Exception) -> dict[str, Any]:
    """What every entry point answers for a refusal (the HTTP API maps `type` to a code)."""
    if isinstance(exc, ConflictError):
        return {"type": "conflict", "field": exc.field, "detail": exc.detail, "message": str(exc)}
    if isinstance(exc, UnknownExperimentError):
        return {"type": "unknown", "message": str(exc)}
    if isinstance(exc, TransientError):
        return {"type": "transient", "message": str(exc)}
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in errors[:5]
        )
        return {"type": "invalid", "message": message}
    return {"type": "invalid", "message": str(exc)}


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    front: FastPath


class FastPath:
    def __init__(self, acquisition: Acquisition, reporter: Reporter, receiving: Budget) -> None:
        self.acquisition = acquisition
        self.reporter = reporter
        self.receiving = receiving
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._server: _Server | None = None

    def serve(self, path: Path) -> None:
        """Listen on `path` on a daemon thread (replacing a stale socket of an earlier run)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # Bound and listening under another name first: once `path` exists, it answers.
        fresh = path.with_name(f".{path.name}.new")
        fresh.unlink(missing_ok=True)
        server = _Server(str(fresh), _Connection)
        server.front = self
        os.chmod(fresh, 0o660)
        os.replace(fresh, path)
        self._server = server
        threading.Thread(target=server.serve_forever, name="fastpath", daemon=True).start()
        log.info("fast local path on %s", path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- one request ------------------------------------------------------------------------

    def handle(
        self, sock: socket.socket, request: dict[str, Any], size: int, read: list[bool]
    ) -> Any:
        """Answer one request; `read[0]` says whether its payload was read (if not, the
        connection cannot go on after a refusal)."""
        op = request.get("op")
        a = self.acquisition
        if op == "frame":
            return self._frame(sock, request, size, read)
        read[0] = True
        if size:
            raise PermanentError(f"{op} carries no payload, got {size} bytes")
        if op == "start":
            return a.start(request.get("spec") or {}).model_dump(mode="json")
        image_id = UUID(str(request.get("image_id"))) if "image_id" in request else None
        if op == "finalize" and image_id:
            timeout = request.get("timeout")
            progress = a.finalize(
                image_id,
                partial=bool(request.get("partial")),
                not_planned=_positions(request.get("not_planned")),
                timeout=None if timeout is None else float(timeout),
            )
            return progress.model_dump(mode="json")
        if op == "abort" and image_id:
            return a.abort(image_id).model_dump(mode="json")
        if op == "experiment" and image_id:
            return a.experiment(image_id).model_dump(mode="json")
        if op == "experiments":
            return {"experiments": [e.model_dump(mode="json") for e in a.experiments()]}
        if op == "status":
            return self.reporter.status().model_dump(mode="json")
        raise PermanentError(f"unknown request {op!r}")

    def _frame(
        self, sock: socket.socket, request: dict[str, Any], size: int, read: list[bool]
    ) -> Any:
        image_id = UUID(str(request.get("image_id")))
        manifest = self.acquisition.spool.manifest(image_id)
        if size != manifest.tile_bytes:
            raise PermanentError(
                f"frame payload is {size} bytes, a {manifest.tile_width}x{manifest.tile_height} "
                f"{manifest.dtype} frame is {manifest.tile_bytes}"
            )
        self.receiving.acquire(size)
        try:
            dtype = np.dtype(str(request.get("dtype") or manifest.dtype.value))
            pixels = np.empty(size // dtype.itemsize, dtype=dtype)
            _receive_into(sock, pixels.data.cast("B"))
            read[0] = True
            frame = pixels.reshape(manifest.tile_height, manifest.tile_width)
            meta = request.get("meta") or {}
            result = self.acquisition.write_frame(image_id, frame, meta, owned=True)
        finally:
            self.receiving.release(size)
        return result.model_dump(mode="json")


class _Connection(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        front = self.server.front
        if not front._connections.acquire(blocking=False):
            self._answer({"ok": False, "error": {"type": "transient",
                                                 "message": "too many connections"}})  # fmt: skip
            return
        try:
            while self._one(front):
                pass
        finally:
            front._connections.release()

    def _one(self, front: FastPath) -> bool:
        sock: socket.socket = self.request
        try:
            length, size = HEADER.unpack(_recv_exactly(sock, HEADER.size))
        except (EOFError, OSError):
            return False
        if length > MAX_REQUEST_JSON:
            self._answer(
                {"ok": False, "error": {"type": "invalid", "message": "request too large"}}
            )
            return False
        read = [size == 0]
        try:
            request = json.loads(_recv_exactly(sock, length))
            if not isinstance(request, dict):
                raise PermanentError("a request is a JSON object")
            result = front.handle(sock, request, size, read)
        except (EOFError, ConnectionError):
            return False
        except (TilebridgeError, ValidationError, ValueError) as exc:
            self._answer({"ok": False, "error": error_answer(exc)})
            return bool(read[0])
        except Exception as exc:
            log.exception("fast path request")
            self._answer({"ok": False, "error": {"type": "invalid", "message": repr(exc)}})
            return False
        self._answer({"ok": True, "result": result})
        return True

    def _answer(self, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        with suppress(OSError):  # the client went away: nothing to tell
            self.request.sendall(HEADER.pack(len(data), 0) + data)


def _positions(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise PermanentError(f"not_planned must be a list of position indices, not {value!r:.80}")
    return value


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    _receive_into(sock, memoryview(buffer))
    return bytes(buffer)


def _receive_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise EOFError("the client closed the connection")
        view = view[got:]

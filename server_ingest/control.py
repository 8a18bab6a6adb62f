"""The ingest's control socket: how `server-ingest images retry|discard` and `device remove`
reach the running service, so an administrator never writes the ledger beside it.

A Unix socket (`IngestSettings.control_socket`, mode 0600, in the data directory) served by
one thread ("ingest-control"). Only root and the service's own user may use it (checked with
SO_PEERCRED, on top of the file mode). One JSON request per connection, one JSON answer:

    {"op": "retry",   "device": "scope-1", "image_id": "…"}
    {"op": "discard", "device": "scope-1", "image_id": "…", "detail": "…"}
    {"op": "clear_device_status", "device": "scope-1"}
    -> {"ok": true, "phase": "storing", "message": "image scope-1/…: failed -> storing"}

Image commands become `AdminRequest`s in the core's inbox: the core applies them like any
other event, in order with everything else, and answers. Nothing here touches the ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server_ingest.events import AdminAnswer, AdminRequest, InboxItem
from server_ingest.ledger.records import ImageKey
from server_ingest.lifecycle import DISCARDED_DETAIL, Discard, Retry
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.topics import check_device_id

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
ANSWER_TIMEOUT_S = 30.0


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["retry", "discard", "clear_device_status"]
    device: str = Field(min_length=1, max_length=64)
    image_id: UUID | None = None
    detail: str = Field(default=DISCARDED_DETAIL, max_length=512)


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    phase: str | None = None
    message: str


class ControlServer:
    def __init__(
        self,
        path: Path,
        post: Callable[[InboxItem], None],
        clear_device_status: Callable[[str], None],
    ) -> None:
        self.path = path
        self._post = post
        self._clear = clear_device_status
        self._socket: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ingest-control", daemon=True)

    def start(self) -> ControlServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # the service holds the ledger lock: it is ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            with _short(self.path) as address:
                sock.bind(address)
        except OSError as exc:
            sock.close()
            raise PermanentError(f"control socket {self.path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old)
        sock.listen(8)
        sock.settimeout(0.5)
        self._socket = sock
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        assert self._socket is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with conn:
                try:
                    self._one(conn)
                except Exception:  # one bad client never ends the control socket
                    log.exception("control request failed")

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        uid = _peer_uid(conn)
        if uid not in (0, os.getuid()):
            _send(conn, Answer(ok=False, message=f"uid {uid} may not control the ingest"))
            return
        raw = _read_line(conn)
        try:
            request = Request.model_validate_json(raw)
        except ValidationError as exc:
            _send(conn, Answer(ok=False, message=f"bad request: {exc.errors()[0]['msg']}"))
            return
        _send(conn, self.handle(request, f"uid {uid}"))

    def handle(self, request: Request, by: str) -> Answer:
        try:
            device = check_device_id(request.device)
        except Exception as exc:
            return Answer(ok=False, message=str(exc))
        if request.op == "clear_device_status":
            self._clear(device)
            log.warning("retained status of device %s cleared by an administrator (%s)", device, by)
            return Answer(ok=True, message=f"retained status of {device} cleared")
        if request.image_id is None:
            return Answer(ok=False, message=f"{request.op} needs an image_id")
        at = time.time()
        event = Retry(at) if request.op == "retry" else Discard(at, request.detail)
        reply: Future[AdminAnswer] = Future()
        self._post(AdminRequest(ImageKey(device, request.image_id), event, reply, by))
        try:
            answer = reply.result(timeout=ANSWER_TIMEOUT_S)
        except FutureTimeout:
            return Answer(ok=False, message="the ingest did not answer in time")
        return Answer(ok=answer.ok, phase=answer.phase, message=answer.message)


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """A socket address for `path` within the kernel's 107 bytes: a long path (a deep test
    directory) is reached through an open descriptor of its folder."""
    if len(os.fsencode(path)) <= 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < MAX_REQUEST:
        chunk = conn.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _send(conn: socket.socket, answer: Answer) -> None:
    with contextlib.suppress(OSError):  # the client went away: nothing to tell
        conn.sendall(answer.model_dump_json().encode() + b"\n")


def ask(path: Path, request: Request, timeout: float = ANSWER_TIMEOUT_S + 5) -> Answer | None:
    """Send `request` to the ingest listening on `path`; None if no ingest listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            with _short(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(request.model_dump_json().encode() + b"\n")
        raw = _read_line(sock)
    finally:
        sock.close()
    if not raw:
        return Answer(ok=False, message="the ingest closed the control connection")
    return Answer.model_validate(json.loads(raw))

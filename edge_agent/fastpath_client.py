"""The acquisition program's side of the fast local path: frames to a running agent over
its Unix-domain socket (`local_socket` in the agent's settings).

Needs numpy, pydantic and the wire protocol's models only (no HTTP, broker or storage
package), so the ImSwitch adapter installs nothing server-side. It implements
`edge_agent.frontdoor.FrontDoor`: the same calls, answers and errors as the in-process
`Acquisition`.

Framing (both directions, one request at a time per connection): a 8-byte header
`!II` = (JSON length, payload length), the JSON, then `payload length` raw bytes (a frame's
pixels, little-endian, row-major; 0 for everything else). Answers carry no payload. The
pixels go from the caller's array to the socket without a copy in Python.

A call that loses its connection (the agent restarted) is sent once more on a new one: every
call is idempotent (a frame accepted before answers `accepted: false` the second time).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np

from edge_agent.errors import ConflictError, UnknownExperimentError
from edge_agent.models import (
    ExperimentProgress,
    ExperimentSpec,
    FrameInfo,
    FrameResult,
    StartedExperiment,
)
from tilebridge_protocol.errors import PermanentError, TilebridgeError, TransientError
from tilebridge_protocol.status import DeviceStatus

HEADER = struct.Struct("!II")
MAX_ANSWER = 64 * 1024 * 1024
DEFAULT_SOCKET = Path("/run/tilebridge-edge/acquire.sock")


def raise_for(error: Mapping[str, Any]) -> None:
    """Turn an error answer back into the exception the agent raised."""
    kind, message = error.get("type"), str(error.get("message", ""))
    if kind == "conflict":
        raise ConflictError(str(error.get("field", "")), str(error.get("detail", message)))
    if kind == "unknown":
        raise UnknownExperimentError(message)
    if kind == "transient":
        raise TransientError(message)
    raise PermanentError(message)


class FastPathClient:
    """One connection to the agent; safe to share between threads (calls are serialized)."""

    def __init__(self, socket_path: str | Path = DEFAULT_SOCKET, timeout: float = 60.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> FastPathClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the front door --------------------------------------------------------------------

    def start(self, spec: ExperimentSpec | Mapping[str, Any]) -> StartedExperiment:
        body = (
            spec.model_dump(mode="json", exclude_unset=True)
            if isinstance(spec, ExperimentSpec)
            else dict(spec)
        )
        return StartedExperiment.model_validate(self._call({"op": "start", "spec": body}))

    def write_frame(
        self,
        image_id: UUID,
        frame: np.ndarray[Any, Any],
        metadata: FrameInfo | Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> FrameResult:
        if isinstance(metadata, FrameInfo):
            meta: dict[str, Any] = metadata.model_dump(mode="json", exclude_unset=True)
        else:
            meta = dict(metadata or {})
        meta.update(fields)
        pixels = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
        request = {"op": "frame", "image_id": str(image_id), "meta": meta}
        answer = self._call(request, pixels.data.cast("B"), str(pixels.dtype))
        return FrameResult.model_validate(answer)

    def finalize(
        self,
        image_id: UUID,
        *,
        partial: bool = False,
        not_planned: Sequence[int] = (),
        timeout: float | None = None,
    ) -> ExperimentProgress:
        request: dict[str, Any] = {"op": "finalize", "image_id": str(image_id), "partial": partial}
        if not_planned:
            request["not_planned"] = list(not_planned)
        if timeout is not None:
            request["timeout"] = timeout
        return ExperimentProgress.model_validate(self._call(request, wait=timeout))

    def abort(self, image_id: UUID) -> ExperimentProgress:
        return ExperimentProgress.model_validate(
            self._call({"op": "abort", "image_id": str(image_id)})
        )

    def experiment(self, image_id: UUID) -> ExperimentProgress:
        return ExperimentProgress.model_validate(
            self._call({"op": "experiment", "image_id": str(image_id)})
        )

    def experiments(self) -> list[ExperimentProgress]:
        answer = self._call({"op": "experiments"})
        return [ExperimentProgress.model_validate(e) for e in answer["experiments"]]

    def status(self) -> DeviceStatus:
        """The agent's device status (as on its retained status topic)."""
        return DeviceStatus.model_validate(self._call({"op": "status"}))

    # -- transport -------------------------------------------------------------------------

    def _call(
        self,
        request: dict[str, Any],
        payload: memoryview | None = None,
        dtype: str | None = None,
        wait: float | None = None,
    ) -> Any:
        if dtype is not None:
            request["dtype"] = dtype
        data = json.dumps(request).encode()
        with self._lock:
            for attempt in (1, 2):
                try:
                    sock = self._connect(wait)
                    sock.sendall(HEADER.pack(len(data), len(payload) if payload else 0) + data)
                    if payload:
                        sock.sendall(payload)
                    answer = self._answer(sock)
                    break
                except (TimeoutError, ConnectionError, EOFError) as exc:
                    self._drop()
                    if attempt == 2 or isinstance(exc, TimeoutError):
                        raise TransientError(
                            f"the edge agent at {self.socket_path} did not answer: {exc!r}"
                        ) from exc
                except FileNotFoundError as exc:
                    self._drop()
                    raise TransientError(
                        f"no edge agent listens on {self.socket_path} (is `edge-agent run` up?)"
                    ) from exc
        if not answer.get("ok"):
            raise_for(answer.get("error") or {})
        return answer.get("result")

    def _connect(self, wait: float | None) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        self._sock.settimeout(None if wait is None and self.timeout is None else
                              max(self.timeout, (wait or 0) + 30))  # fmt: skip
        return self._sock

    def _answer(self, sock: socket.socket) -> dict[str, Any]:
        length, _ = HEADER.unpack(_recv_exactly(sock, HEADER.size))
        if length > MAX_ANSWER:
            raise TilebridgeError(f"answer of {length} bytes from the agent")
        result: dict[str, Any] = json.loads(_recv_exactly(sock, length))
        return result

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise EOFError("the agent closed the connection")
        view = view[got:]
    return bytes(buffer)

"""The agent's local HTTP API: what ImSwitch (or any acquisition program) calls instead of
writing files itself. Every frame takes the same path as the Python API (OMEWriter).

Bound to 127.0.0.1 by default. A token (`http_token` / `http_token_file`, sent as
`Authorization: Bearer <token>`) is required whenever one is configured, and the server
refuses to start on anything but loopback without one. OpenAPI: `/openapi.json`, `/docs`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import numpy as np
import uvicorn
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from edge_agent.agent import EdgeAgent
from edge_agent.client import is_loopback, resolve_token
from edge_agent.omewriter import (
    ExperimentProgress,
    ExperimentSpec,
    FrameInfo,
    OMEWriter,
    OMEWriterConfig,
    apply_transport,
)
from edge_agent.settings import AgentSettings
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.messages import PixelType, StagePosition
from tilebridge_protocol.status import DeviceStatus
from tilebridge_storage.base import StorageBackend

log = logging.getLogger(__name__)

KEEP_EXPERIMENTS = 100
"""Finished experiments kept for /status; older ones are forgotten (their data is not)."""


METADATA_HEADER = "JSON object of frame metadata (ImSwitch's names accepted); query parameters win."


class ExperimentStarted(BaseModel):
    image_id: UUID
    experiment: str
    frames_total: int
    tile_width: int
    tile_height: int
    dtype: PixelType
    tile_bytes: int
    """Exact body size of every frame."""
    positions: list[StagePosition]
    """tile_index -> planned stage position."""


class FrameAccepted(BaseModel):
    accepted: bool
    """False: this frame was already written (a repeat changes nothing)."""
    tile: tuple[int, int, int, int]
    """(tile_index, z_index, channel_index, time_index)."""
    frames_received: int


class StatusReport(BaseModel):
    device: DeviceStatus
    experiments: list[ExperimentProgress]
    """Newest first."""


class EdgeService:
    """The state behind the API: the current config and the experiments, by image id."""

    def __init__(
        self,
        agent: EdgeAgent,
        config: OMEWriterConfig | None = None,
        state_file: Path | None = None,
        backends: dict[str, StorageBackend] | None = None,
    ) -> None:
        self.agent = agent
        self.state_file = state_file
        self.backends = backends
        self.experiments: OrderedDict[UUID, OMEWriter] = OrderedDict()
        self._lock = threading.Lock()
        self.config = config or self._load() or OMEWriterConfig.for_agent(agent)

    def set_config(self, update: dict[str, Any]) -> OMEWriterConfig:
        """Change the given fields; a refused update changes nothing."""
        with self._lock:
            config = OMEWriterConfig.model_validate(self.config.model_dump() | update)
            apply_transport(self.agent, config)
            self.config = config
            self._save()
            return config

    def start(self, spec: ExperimentSpec) -> OMEWriter:
        with self._lock:
            old = self.experiments.get(spec.image_id) if spec.image_id else None
            progress = old.progress() if old else None
            if progress is not None and progress.state in ("acquiring", "finalizing"):
                # A second writer would replace the first one's partial output.
                raise PermanentError(f"experiment {spec.image_id} is {progress.state} already")
            writer = OMEWriter(self.agent, self.config.model_copy(), self.backends)
            manifest = writer.start_experiment(spec)
            self.experiments[manifest.image_id] = writer
            self.experiments.move_to_end(manifest.image_id)
            self._forget_old()
            return writer

    def writer(self, image_id: UUID) -> OMEWriter:
        try:
            return self.experiments[image_id]
        except KeyError:
            raise HTTPException(404, f"no experiment {image_id} on this agent") from None

    def status(self) -> StatusReport:
        writers = list(self.experiments.values())  # a snapshot: starts may come meanwhile
        progress = [w.progress() for w in reversed(writers)]
        return StatusReport(
            device=self.agent.status(), experiments=[p for p in progress if p is not None]
        )

    def _forget_old(self) -> None:
        for image_id in list(self.experiments)[: max(0, len(self.experiments) - KEEP_EXPERIMENTS)]:
            progress = self.experiments[image_id].progress()
            if progress is None or progress.state in ("finalized", "aborted"):
                del self.experiments[image_id]

    def _load(self) -> OMEWriterConfig | None:
        if self.state_file is None or not self.state_file.exists():
            return None
        try:
            return OMEWriterConfig.model_validate_json(self.state_file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring the saved OMEWriter config %s: %s", self.state_file, exc)
            return None

    def _save(self) -> None:
        if self.state_file is not None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(self.config.model_dump_json(indent=2))
            tmp.replace(self.state_file)


BEARER = HTTPBearer(auto_error=False, description="Required when the agent has a token.")


def create_app(service: EdgeService, token: str | None = None) -> FastAPI:
    # Annotations are strings here (PEP 563): whatever they name must be module-level.
    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token", {"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="tilebridge edge agent",
        summary="Local API of the microscope's agent: OMEWriter config, experiments, frames.",
        version="1",
        dependencies=[Depends(authorize)],
    )
    _errors(app)
    config_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/OMEWriterConfig"}}
            },
        }
    }

    @app.get("/config", response_model=OMEWriterConfig, tags=["config"])
    @app.get("/getOMEWriterConfig", response_model=OMEWriterConfig, tags=["config"])
    def get_config() -> OMEWriterConfig:
        """The OMEWriter configuration new experiments use (ImSwitch: getOMEWriterConfig)."""
        return service.config

    @app.post("/config", response_model=OMEWriterConfig, tags=["config"], openapi_extra=config_body)
    @app.post(
        "/setOMEWriterConfig",
        response_model=OMEWriterConfig,
        tags=["config"],
        openapi_extra=config_body,
    )
    def set_config(update: Annotated[dict[str, Any], Body()]) -> OMEWriterConfig:
        """Change the given fields (others keep their value); takes effect for the next
        experiment, compression and bandwidth limit at once (ImSwitch: setOMEWriterConfig)."""
        return service.set_config(update)

    @app.post("/experiments", status_code=201, tags=["experiments"])
    def start_experiment(spec: ExperimentSpec) -> ExperimentStarted:
        """Open an experiment (one image) on every configured target."""
        m = service.start(spec).manifest
        return ExperimentStarted(
            image_id=m.image_id, experiment=m.experiment, frames_total=m.tile_count,
            tile_width=m.tile_width, tile_height=m.tile_height, dtype=m.dtype,
            tile_bytes=m.tile_bytes, positions=list(m.positions),
        )  # fmt: skip

    @app.get("/experiments", tags=["experiments"])
    def list_experiments() -> list[ExperimentProgress]:
        return service.status().experiments

    @app.get("/experiments/{image_id}", tags=["experiments"])
    def experiment(image_id: UUID) -> ExperimentProgress:
        progress = service.writer(image_id).progress()
        assert progress is not None  # a writer is registered only once started
        return progress

    @app.post(
        "/experiments/{image_id}/frames",
        tags=["experiments"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
                "description": "The frame's pixels, little-endian, row-major: exactly "
                "tile_width x tile_height x bytes per pixel.",
            }
        },
    )
    async def write_frame(
        image_id: UUID,
        request: Request,
        tile_index: Annotated[int | None, Query(ge=0)] = None,
        z_index: Annotated[int | None, Query(ge=0)] = None,
        channel_index: Annotated[int | None, Query(ge=0)] = None,
        time_index: Annotated[int | None, Query(ge=0)] = None,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        pixel_size_um: Annotated[float | None, Query(gt=0)] = None,
        channel: Annotated[str | None, Query(max_length=128)] = None,
        exposure_ms: Annotated[float | None, Query(ge=0)] = None,
        timestamp: str | None = None,
        x_frame_metadata: Annotated[str | None, Header(description=METADATA_HEADER)] = None,
    ) -> FrameAccepted:
        """One camera frame. Returns once it is durable in the disk buffer and queued for
        the local backends (waits only while their memory bound is reached)."""
        writer = service.writer(image_id)
        m = writer.manifest
        query = {
            "tile_index": tile_index, "z_index": z_index, "channel_index": channel_index,
            "time_index": time_index, "x_um": x_um, "y_um": y_um, "z_um": z_um,
            "pixel_size_um": pixel_size_um, "channel": channel, "exposure_ms": exposure_ms,
            "timestamp": timestamp,
        }  # fmt: skip
        info = FrameInfo.model_validate(
            _header_metadata(x_frame_metadata) | {k: v for k, v in query.items() if v is not None}
        )
        body = await _read_exactly(
            request, m.tile_bytes, f"{m.tile_width}x{m.tile_height} {m.dtype}"
        )
        frame = np.frombuffer(body, m.dtype.numpy).reshape(m.tile_height, m.tile_width)
        key = writer.key_of(info)
        accepted = await run_in_threadpool(writer.write_frame, frame, info, owned=True)
        progress = writer.progress()
        return FrameAccepted(
            accepted=accepted,
            tile=(key.index, key.z, key.c, key.t),
            frames_received=progress.frames_received if progress else 0,
        )

    @app.post("/experiments/{image_id}/finalize", tags=["experiments"])
    def finalize(
        image_id: UUID,
        timeout: Annotated[float | None, Query(ge=0, le=86400)] = None,
    ) -> ExperimentProgress:
        """Close the experiment once every frame is written; waits for the local backends
        (up to `timeout` s). The server side completes later: poll the experiment."""
        return service.writer(image_id).finalize(timeout)

    @app.post("/experiments/{image_id}/abort", tags=["experiments"])
    def abort(image_id: UUID) -> ExperimentProgress:
        """Stop; local partial output is removed, frames already buffered still go to the
        server."""
        writer = service.writer(image_id)
        writer.abort()
        progress = writer.progress()
        assert progress is not None
        return progress

    @app.get("/status", tags=["status"])
    def status() -> StatusReport:
        """Per experiment: frames received, written per backend, acknowledged by the server;
        backend failures; the device status (as on the retained status topic)."""
        return service.status()

    return app


def _header_metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise HTTPException(422, "X-Frame-Metadata is not JSON") from None
    if not isinstance(value, dict):
        raise HTTPException(422, "X-Frame-Metadata must be a JSON object")
    return value


async def _read_exactly(request: Request, size: int, what: str) -> bytearray:
    """The body, refused as soon as it is longer than a frame (never buffered beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > size:
        raise HTTPException(413, f"frame body is {declared} bytes, a {what} frame is {size}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > size:
            raise HTTPException(413, f"frame body exceeds {size} bytes ({what})")
    if len(body) != size:
        raise HTTPException(422, f"frame body is {len(body)} bytes, a {what} frame is {size}")
    return body


def _errors(app: FastAPI) -> None:
    def fields(errors: list[Any]) -> JSONResponse:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors
        ]
        message = "; ".join(
            f"{'.'.join(str(p) for p in d['loc'] if p != 'body') or 'request'}: {d['msg']}"
            for d in detail[:5]
        )
        return JSONResponse({"message": message, "detail": detail}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return fields(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def model_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return fields(list(exc.errors()))

    @app.exception_handler(PermanentError)
    async def refused(_: Request, exc: PermanentError) -> JSONResponse:
        return JSONResponse({"message": str(exc), "detail": str(exc)}, status_code=422)

    @app.exception_handler(TransientError)
    async def busy(_: Request, exc: TransientError) -> JSONResponse:
        return JSONResponse(
            {"message": str(exc), "detail": str(exc)},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"message": str(exc.detail), "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )


def check_binding(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        raise PermanentError(
            f"http_host {host} is reachable from other machines: set http_token_file "
            "(or http_token) so the API requires a token, or bind to 127.0.0.1"
        )


def serve_http(
    agent: EdgeAgent,
    settings: AgentSettings,
    stop: threading.Event | None = None,
    backends: dict[str, StorageBackend] | None = None,
) -> uvicorn.Server:
    """Start the API on a daemon thread (the `edge-agent run` service); it stops with `stop`."""
    assert settings.http_port is not None
    token = resolve_token(settings)
    check_binding(settings.http_host, token)
    service = EdgeService(
        agent, state_file=settings.spool_dir / "omewriter.json", backends=backends
    )
    server = start_server(create_app(service, token), settings.http_host, settings.http_port)
    if stop is not None:

        def shutdown() -> None:
            stop.wait()
            server.should_exit = True

        threading.Thread(target=shutdown, name="edge-http-stop", daemon=True).start()
    log.info("HTTP API on http://%s:%d", settings.http_host, settings.http_port)
    return server


def start_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    """Serve `app` on a daemon thread; returns once it listens. Stop: `should_exit = True`."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, name="edge-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise TransientError(f"HTTP API did not start on {host}:{port}")
        time.sleep(0.02)
    return server

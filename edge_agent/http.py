"""The agent's local HTTP API: the front door for remote tools and scripts (the acquisition
program on the Pi itself is faster on the fast local path, `edge_agent.fastpath`).

Every route calls `Acquisition`, like the other entry points, and maps its refusals the same
way: 422 (PermanentError, with the reason), 409 (ConflictError, naming the field), 404
(UnknownExperimentError), 503 + Retry-After (TransientError: nothing was accepted, retry).

Hardening (docs/security.md): bound to 127.0.0.1 by default and refuses to start elsewhere
without a token; when a token is configured it is required on every route (`/docs` and
`/openapi.json` included); the Host header must be one of `http_allowed_hosts` (a DNS
rebinding page in a browser on the Pi cannot reach it); a frame body larger than the
experiment's frame is refused before it is read, and the bytes being received are paid for
from the front door's memory budget.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

import numpy as np
import uvicorn
from fastapi import Body, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.middleware.trustedhost import TrustedHostMiddleware

from edge_agent.acquisition import Acquisition
from edge_agent.app import EdgeApp
from edge_agent.client import is_loopback, resolve_token
from edge_agent.config import ConfigStore, OMEWriterConfig
from edge_agent.errors import ConflictError, UnknownExperimentError
from edge_agent.localtargets import Budget
from edge_agent.models import (
    ExperimentProgress,
    ExperimentSpec,
    FrameInfo,
    FrameResult,
    StartedExperiment,
)
from edge_agent.status import Reporter
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.status import DeviceStatus

log = logging.getLogger(__name__)

METADATA_HEADER = "JSON object of frame metadata (ImSwitch's names accepted); query parameters win."


class StatusReport(BaseModel):
    device: DeviceStatus
    experiments: list[ExperimentProgress]
    """Newest first."""


def create_app(
    acquisition: Acquisition,
    config: ConfigStore,
    reporter: Reporter,
    receiving: Budget,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]"),
) -> FastAPI:
    app = FastAPI(
        title="tilebridge edge agent",
        summary="Local API of the microscope's agent: acquisition defaults, experiments, frames.",
        version="2",
    )
    _errors(app)

    @app.middleware("http")
    async def authorize(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # A middleware, not a route dependency: the docs and the schema need the token too.
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse(
                    {"message": "missing or wrong token", "detail": "missing or wrong token"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        return await call_next(request)

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
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
        """The defaults new experiments use when their spec names no targets."""
        return config.current()

    @app.post("/config", response_model=OMEWriterConfig, tags=["config"], openapi_extra=config_body)
    @app.post(
        "/setOMEWriterConfig",
        response_model=OMEWriterConfig,
        tags=["config"],
        openapi_extra=config_body,
    )
    def set_config(update: Annotated[dict[str, Any], Body()]) -> OMEWriterConfig:
        """Change the given fields (others keep their value); a refused update changes
        nothing. Takes effect for the next experiment; compression and the bandwidth cap at
        once."""
        return config.update(update)

    @app.post("/experiments", status_code=201, tags=["experiments"])
    def start_experiment(spec: ExperimentSpec, response: Response) -> StartedExperiment:
        """Open an experiment (one image) on every target, or resume it (same image_id):
        201 when created, 200 when resumed, with the complete stored spec."""
        started = acquisition.start(spec)
        if started.resumed:
            response.status_code = 200
        return started

    @app.get("/experiments", tags=["experiments"])
    def list_experiments() -> list[ExperimentProgress]:
        return acquisition.experiments()

    @app.get("/experiments/{image_id}", tags=["experiments"])
    def experiment(image_id: UUID) -> ExperimentProgress:
        """Answers after agent restarts, until the server completed the image and for
        `experiment_retention_s` after."""
        return acquisition.experiment(image_id)

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
    ) -> FrameResult:
        """One camera frame. Returns once it is durable in the spool (`accepted: true`), or
        says it was accepted before (`accepted: false` and the reason)."""
        query = {
            "tile_index": tile_index, "z_index": z_index, "channel_index": channel_index,
            "time_index": time_index, "x_um": x_um, "y_um": y_um, "z_um": z_um,
            "pixel_size_um": pixel_size_um, "channel": channel, "exposure_ms": exposure_ms,
            "timestamp": timestamp,
        }  # fmt: skip
        info = FrameInfo.model_validate(
            _header_metadata(x_frame_metadata) | {k: v for k, v in query.items() if v is not None}
        )
        m = await run_in_threadpool(acquisition.spool.manifest, image_id)
        what = f"{m.tile_width}x{m.tile_height} {m.dtype}"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > m.tile_bytes:
            raise HTTPException(
                413, f"frame body is {declared} bytes, a {what} frame is {m.tile_bytes}"
            )
        await run_in_threadpool(receiving.acquire, m.tile_bytes)
        try:
            pixels = await _read_into(request, np.empty(m.tile_bytes, np.uint8), what)
            frame = pixels.view(m.dtype.numpy).reshape(m.tile_height, m.tile_width)
            return await run_in_threadpool(
                acquisition.write_frame, image_id, frame, info, owned=True
            )
        finally:
            receiving.release(m.tile_bytes)

    @app.post("/experiments/{image_id}/finalize", tags=["experiments"])
    def finalize(
        image_id: UUID,
        partial: bool = False,
        not_planned: Annotated[list[int] | None, Query(max_length=100_000)] = None,
        timeout: Annotated[float | None, Query(ge=0, le=86400)] = None,
    ) -> ExperimentProgress:
        """Close the experiment (with `partial`: with the frames it has; `not_planned`: the
        positions never planned, e.g. a round scan area's empty grid cells, which leave the
        image complete); waits for the local targets up to `timeout` s. The server completes
        later: poll the experiment."""
        return acquisition.finalize(
            image_id, partial=partial, not_planned=not_planned or (), timeout=timeout
        )

    @app.post("/experiments/{image_id}/abort", tags=["experiments"])
    def abort(image_id: UUID) -> ExperimentProgress:
        """Discard the experiment on the Pi (local partial output, unsent frames)."""
        return acquisition.abort(image_id)

    @app.get("/status", tags=["status"])
    def status() -> StatusReport:
        """The device status (as on the retained status topic) and every experiment."""
        return StatusReport(device=reporter.status(), experiments=acquisition.experiments())

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


async def _read_into(
    request: Request, target: np.ndarray[Any, Any], what: str
) -> np.ndarray[Any, Any]:
    """The body straight into `target`; refused as soon as it is longer (never buffered)."""
    view = memoryview(target.data).cast("B")
    size, filled = len(view), 0
    async for chunk in request.stream():
        if filled + len(chunk) > size:
            raise HTTPException(413, f"frame body exceeds {size} bytes ({what})")
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled != size:
        raise HTTPException(422, f"frame body is {filled} bytes, a {what} frame is {size}")
    return target


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

    @app.exception_handler(ConflictError)
    async def conflict(_: Request, exc: ConflictError) -> JSONResponse:
        body = {"message": str(exc), "detail": exc.detail, "field": exc.field}
        return JSONResponse(body, status_code=409)

    @app.exception_handler(UnknownExperimentError)
    async def unknown(_: Request, exc: UnknownExperimentError) -> JSONResponse:
        return JSONResponse({"message": str(exc), "detail": str(exc)}, status_code=404)

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


def allowed_hosts(configured: tuple[str, ...], host: str) -> tuple[str, ...]:
    """The Host header names to accept (any port): the configured ones and the bound one."""
    return tuple(sorted({*configured, host} - {"0.0.0.0", "::", ""}))


def serve(agent: EdgeApp) -> uvicorn.Server:
    """Serve the agent's HTTP API (settings `http_*`) on a daemon thread; stop it with
    `should_exit = True`. Refuses to start on a non-loopback address without a token."""
    s = agent.settings
    if s.http_port is None:
        raise PermanentError("http_port is not set: the agent serves no HTTP API")
    token = resolve_token(s)
    check_binding(s.http_host, token)
    app = create_app(
        agent.acquisition, agent.config, agent.reporter, agent.receiving, token,
        allowed_hosts(s.http_allowed_hosts, s.http_host),
    )  # fmt: skip
    server = start_server(app, s.http_host, s.http_port)
    log.info("HTTP API on http://%s:%d", s.http_host, s.http_port)
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

"""The dashboard's web app: the page, `/api/state` for first paint, `/events` for live updates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from uuid import UUID

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from server_ingest.dashboard.board import Event, StatusBoard

STATIC = Path(__file__).parent / "static"
QUEUE_LIMIT = 2000
"""Events buffered per page; a page this far behind is dropped and reconnects to a snapshot."""
KEEPALIVE_S = 15.0
"""Proxies close idle connections; a comment line this often keeps the stream open."""
SECURITY_HEADERS = {
    # Everything the page needs comes from this server; status text is never markup.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    board: StatusBoard,
    tick: Callable[[], None] | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> FastAPI:
    """`tick` runs every second (expiry, connection state); `stopping` ends open streams."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_ticker(tick)) if tick else None
        yield
        if task:
            task.cancel()

    app = FastAPI(
        title="tilebridge dashboard",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/state")
    async def state() -> JSONResponse:
        return JSONResponse(board.snapshot(), headers={"Cache-Control": "no-store"})

    @app.get("/events")
    async def events() -> StreamingResponse:
        return StreamingResponse(
            _stream(board, stopping),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/preview/{device}/{image_id}.png")
    async def preview(device: str, image_id: UUID) -> Response:
        png = board.preview(f"{device}/{image_id}")
        if png is None:
            return Response(status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 only while the dashboard is logged in to the broker: otherwise what it shows
        is stale, and a health check must say so (503)."""
        monitor = board.snapshot()["monitor"]
        ok = bool(monitor["connected"])
        return JSONResponse({"ok": ok, "monitor": monitor}, status_code=200 if ok else 503)

    return app


async def _ticker(tick: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(1.0)
        tick()


def _sse(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(board: StatusBoard, stopping: Callable[[], bool]) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    dropped = False

    def offer(event: Event | None) -> None:
        nonlocal dropped
        if queue.qsize() >= QUEUE_LIMIT:
            dropped = True
        queue.put_nowait(event)

    def listener(event: Event | None) -> None:
        # RuntimeError: the event loop is already closed, the server is gone.
        with suppress(RuntimeError):
            loop.call_soon_threadsafe(offer, event)

    snapshot, unsubscribe = board.listen(listener)
    try:
        yield "retry: 2000\n\n"
        yield _sse("snapshot", snapshot)
        idle = 0.0
        while not stopping():
            try:
                event = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                idle += 1.0
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield ": keepalive\n\n"
                continue
            if event is None or dropped:
                return
            idle = 0.0
            yield _sse(str(event["type"]), event)
    finally:
        unsubscribe()

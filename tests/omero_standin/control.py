"""The stand-in as a process of its own: a small HTTP control API next to its Ice ports.

`python -m tests.omero_standin serve` (see __main__.py) runs one OmeroStandin and this API on
127.0.0.1, so a harness that runs the real programs (devtools/chaos) can pull the same fault
hooks the in-process tests pull, and read back what the server holds without going through
the client under test. Everything answers JSON except the pixels (a `.npy` file).

    GET  /state                      running, crashed, set_tile_calls, armed crash, ports
    POST /stop                       go down like a stopped server (data kept for /start)
    POST /start                      listen again on the same ports
    POST /crash                      die now: connections drop mid-call, passes break
    POST /crash-after?set_tiles=N    die after N more accepted setTile calls (mid-write)
    POST /disarm                     forget an armed crash that has not happened
    GET  /images                     every Image: name, description, datasets, pixel state,
                                     shape (T, C, Z, Y, X), dtype, map annotations by ns
    GET  /images/<id>/pixels         its pixels, (T, C, Z, Y, X) native byte order, as .npy

Stalling is not an endpoint: SIGSTOP/SIGCONT of the process is a truer stall (connections
stay open, nothing answers), and a stopped process could not answer the API anyway.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import omero

from .server import OmeroStandin


def state(server: OmeroStandin) -> dict[str, Any]:
    return {
        "running": server.running,
        "crashed": server.crashed,
        "set_tile_calls": server.set_tile_calls,
        "armed": server.faults.stop_after_set_tiles,
        "port": server.port,
        "tcp_port": server.tcp_port,
    }


def images(server: OmeroStandin) -> list[dict[str, Any]]:
    """What the server holds, image by image (a consistent snapshot under its lock)."""
    with server.lock:
        datasets: dict[int, list[int]] = {}
        for link in server.links("DatasetImageLink"):
            datasets.setdefault(link.child_id, []).append(link.parent_id)
        out = []
        for image in server.images():
            image_id = image.getId().getValue()
            out.append(
                {
                    "id": image_id,
                    "name": _val(image.getName()),
                    "description": _val(image.getDescription()),
                    "datasets": sorted(datasets.get(image_id, [])),
                    **_pixels_info(server, image),
                    "map_annotations": _maps(server, image_id),
                }
            )
        return out


def _val(wrapped: Any) -> Any:
    return None if wrapped is None else wrapped.getValue()


def _pixels_info(server: OmeroStandin, image: Any) -> dict[str, Any]:
    pixels = image.copyPixels()
    if not pixels:
        return {"state": "none", "shape": None, "dtype": None}
    p = pixels[0]
    try:
        pixel_state = server.pixel_state(image.getId().getValue())
    except KeyError:
        pixel_state = "none"
    shape = [_val(getattr(p, f"getSize{axis}")()) for axis in "TCZYX"]
    return {"state": pixel_state, "shape": shape, "dtype": _val(p.getPixelsType().getValue())}


def _maps(server: OmeroStandin, image_id: int) -> dict[str, dict[str, str]]:
    maps: dict[str, dict[str, str]] = {}
    for ann in server.annotations(image_id):
        if isinstance(ann, omero.model.MapAnnotation):
            ns = _val(ann.ns) or ""
            maps.setdefault(ns, {}).update((nv.name, nv.value) for nv in ann.getMapValue() or [])
    return maps


def pixels_npy(server: OmeroStandin, image_id: int) -> bytes:
    out = io.BytesIO()
    np.save(out, server.pixels(image_id), allow_pickle=False)
    return out.getvalue()


def _crash_after(server: OmeroStandin, query: dict[str, list[str]]) -> None:
    calls = int(query.get("set_tiles", ["1"])[0])
    if calls < 1:
        raise ValueError("set_tiles must be at least 1")
    server.faults.stop_after_set_tiles = server.set_tile_calls + calls


def _disarm(server: OmeroStandin, _: dict[str, list[str]]) -> None:
    server.faults.stop_after_set_tiles = None


ACTIONS: dict[str, Callable[[OmeroStandin, dict[str, list[str]]], None]] = {
    "/stop": lambda s, _: s.stop(),
    "/start": lambda s, _: s.start(),
    "/crash": lambda s, _: s.crash(),
    "/crash-after": _crash_after,
    "/disarm": _disarm,
}


def serve_control(server: OmeroStandin, port: int = 0) -> ThreadingHTTPServer:
    """Serve the control API on 127.0.0.1:`port` from a daemon thread; returns the server
    (its `server_address[1]` is the port; `shutdown()` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            parts = path.strip("/").split("/")
            if path == "/state":
                self._json(200, state(server))
            elif path == "/images":
                self._json(200, images(server))
            elif len(parts) == 3 and parts[0] == "images" and parts[2] == "pixels":
                try:
                    body = pixels_npy(server, int(parts[1]))
                except (KeyError, ValueError) as exc:
                    self._json(404, {"error": str(exc)})
                    return
                self._send(200, body, "application/x-npy")
            else:
                self._json(404, {"error": f"no such resource {path}"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            action = ACTIONS.get(url.path)
            if action is None:
                self._json(404, {"error": f"no such action {url.path}"})
                return
            try:
                action(server, parse_qs(url.query))
            except ValueError as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, state(server))

        def _json(self, code: int, value: Any) -> None:
            self._send(code, json.dumps(value).encode(), "application/json")

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per poll would drown the stand-in's log

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="standin-control", daemon=True).start()
    return httpd

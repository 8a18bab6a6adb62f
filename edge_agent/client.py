"""A small client of the agent's HTTP API (edge_agent.http), for remote tools and scripts
(an acquisition program on the Pi itself uses the fast path, `edge_agent.fastpath_client`).

Needs only httpx and numpy. Every method mirrors one endpoint; a refusal raises
`EdgeApiError` with the status code and the server's message (which names the field).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import httpx
import numpy as np

from edge_agent.models import frame_metadata
from edge_agent.settings import AgentSettings
from tilebridge_protocol.errors import PermanentError

__all__ = ["EdgeApiError", "EdgeClient", "frame_metadata"]

QUERY_FIELDS = (
    "tile_index", "z_index", "channel_index", "time_index", "x_um", "y_um", "z_um",
    "pixel_size_um", "channel", "exposure_ms", "timestamp",
)  # fmt: skip
"""Frame metadata the frames endpoint takes as query parameters; the rest goes in
X-Frame-Metadata."""
PIECE = 1024 * 1024


class EdgeApiError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message


class EdgeClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8710",
        token: str | None = None,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        """`http`: an httpx client to use instead (e.g. FastAPI's TestClient)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- configuration ---------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return self._call("GET", "/config")

    def set_config(self, **fields: Any) -> dict[str, Any]:
        """Change the given fields only; returns the whole new configuration."""
        return self._call("POST", "/config", json=fields)

    # -- acquisition -----------------------------------------------------------------------

    def start_experiment(self, **spec: Any) -> dict[str, Any]:
        """Fields of edge_agent.models.ExperimentSpec; returns the stored spec and the plan."""
        return self._call("POST", "/experiments", json=spec)

    def write_frame(
        self, image_id: UUID | str, frame: np.ndarray[Any, Any], **metadata: Any
    ) -> dict[str, Any]:
        """Send one frame (its pixels little-endian) with its metadata; ImSwitch's metadata
        names (`x`, `y`, `illuminationChannel`, ...) are accepted too."""
        pixels = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
        params = {k: _param(v) for k, v in metadata.items() if k in QUERY_FIELDS and v is not None}
        rest = {k: v for k, v in metadata.items() if k not in QUERY_FIELDS and v is not None}
        raw = pixels.data.cast("B")
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(raw))}
        if rest:
            headers["X-Frame-Metadata"] = json.dumps(rest, default=str)
        # The pixels in 1 MiB views of the array: no copy of the frame, and httpx sends them
        # as they are (one `bytes` of 8 MiB costs it ~2x the time; docs/benchmarks.md).
        pieces = (bytes(raw[i : i + PIECE]) for i in range(0, len(raw), PIECE))
        return self._call(
            "POST", f"/experiments/{image_id}/frames", params=params, content=pieces,
            headers=headers,
        )  # fmt: skip

    def finalize(
        self,
        image_id: UUID | str,
        timeout: float | None = None,
        partial: bool = False,
        not_planned: Sequence[int] = (),
    ) -> dict[str, Any]:
        params: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if partial:
            params["partial"] = "true"
        if not_planned:
            params["not_planned"] = list(not_planned)
        return self._call("POST", f"/experiments/{image_id}/finalize", params=params)

    def abort(self, image_id: UUID | str) -> dict[str, Any]:
        return self._call("POST", f"/experiments/{image_id}/abort")

    def experiment(self, image_id: UUID | str) -> dict[str, Any]:
        return self._call("GET", f"/experiments/{image_id}")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    def wait_stored(self, image_id: UUID | str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll until every target of the experiment finished or failed (or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            progress = self.experiment(image_id)
            states = [b["state"] for b in progress["backends"].values()]
            if "writing" not in states or time.monotonic() > deadline:
                return progress
            time.sleep(0.2)

    def experiments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/experiments")  # type: ignore[assignment]
        return result

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            try:
                body = response.json()
                message = body.get("message") or json.dumps(body.get("detail"))
            except ValueError:
                message = response.text
            raise EdgeApiError(response.status_code, message)
        result: dict[str, Any] = response.json()
        return result


def _param(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


# -- shared with the server: where the API is and which token it wants ---------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(settings: AgentSettings) -> str | None:
    if settings.http_token_file is not None:
        try:
            token = settings.http_token_file.read_text().strip()
        except OSError as exc:
            raise PermanentError(f"http_token_file: {exc}") from exc
        if not token:
            raise PermanentError(f"http_token_file {settings.http_token_file} is empty")
        return token
    if settings.http_token is not None:
        return settings.http_token.get_secret_value() or None
    return None


def local_url(settings: AgentSettings) -> str:
    if settings.http_port is None:
        raise PermanentError("http_port is not set: the agent serves no HTTP API")
    host = settings.http_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}"


# -- `edge-agent status` --------------------------------------------------------------------


def show_status(settings: AgentSettings, watch: bool = False, url: str | None = None) -> int:
    """Print the running agent's progress; with `watch`, refresh until interrupted."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise here
    try:
        client = EdgeClient(url or local_url(settings), resolve_token(settings), timeout=10)
    except PermanentError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    with client:
        try:
            if not watch:
                console.print(render_status(client.status()))
                return 0
            with Live(render_status(client.status()), console=console) as live:
                while True:
                    time.sleep(1.0)
                    live.update(render_status(client.status()))
        except (httpx.HTTPError, EdgeApiError) as exc:
            console.print(f"[red]cannot read the agent's status:[/red] {exc}")
            return 1
        except KeyboardInterrupt:
            return 0


def render_status(status: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    device = status["device"]
    head = Text(
        f"{device['device']}: {device['state']}, broker "
        f"{'connected' if device['broker_connected'] else 'disconnected'}, "
        f"{device['buffered_tiles']} tiles buffered, {device['committed_tiles']} committed"
    )
    parts: list[Any] = [head]
    if device.get("last_error"):
        parts.append(Text(f"last error: {device['last_error']}", style="red"))
    for exp in status["experiments"]:
        table = Table(title=f"{exp['experiment']} / {exp['image_name']} ({exp['state']})")
        for column in ("target", "progress", "frames", "state"):
            table.add_column(column)
        total = max(1, exp["frames_total"])
        rows = [("received", exp["frames_received"], "")]
        for name, b in exp["backends"].items():
            label = "server acked" if name == "omero" else name
            note = b["state"] + (f", lost {b['frames_lost']}" if b["frames_lost"] else "")
            rows.append((label, b["frames_written"], note))
        for label, done, note in rows:
            style = "red" if note.startswith("failed") else None
            table.add_row(
                label, ProgressBar(total=total, completed=done, width=30),
                f"{done}/{exp['frames_total']}", Text(note, style=style or ""),
            )  # fmt: skip
        parts.append(table)
        for name, b in exp["backends"].items():
            if b.get("error"):
                parts.append(Text(f"{name}: {b['error']}", style="red"))
    return Group(*parts)

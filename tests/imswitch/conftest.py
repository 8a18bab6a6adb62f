"""The adapter's own tests run against a real edge agent in this process, reached the way an
ImSwitch install reaches it: over the agent's fast-path socket, wired by the adapter's
composition root from its settings. The agent is never started (no broker): what the server
stream would get is what its spool holds (every accepted frame, its measured metadata, the
close manifest), and the local files ImSwitch reads are written by the agent's own local
targets, for real."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from edge_agent.app import EdgeApp
from edge_agent.fastpath_client import FastPathClient
from edge_agent.settings import AgentSettings
from tilebridge_imswitch import root
from tilebridge_imswitch.settings import AdapterSettings
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import CloseManifest, OpenManifest, PlaneMeta, decode_close


@dataclass
class Agent:
    """An agent whose front door listens on `socket` and whose spool is read back here."""

    app: EdgeApp
    socket: Path
    clients: list[FastPathClient] = field(default_factory=list)

    def client(self) -> FastPathClient:
        """A fast-path client of this agent (closed with the fixture)."""
        made = FastPathClient(self.socket)
        self.clients.append(made)
        return made

    def manifests(self) -> dict[UUID, OpenManifest]:
        return {row.image_id: row.manifest for row in self.app.spool.images()}

    def tiles(self, image_id: UUID) -> dict[TileKey, np.ndarray[Any, Any]]:
        """Every frame the server stream gets, as it gets it (the spool's tile files)."""
        m = self.app.spool.manifest(image_id)
        return {
            key: np.frombuffer(self.app.spool.read_tile(image_id, key), m.dtype.numpy).reshape(
                m.tile_height, m.tile_width
            )
            for key in self.app.spool.accepted_tiles(image_id)
        }

    def planes(self, image_id: UUID) -> dict[TileKey, PlaneMeta | None]:
        return self.app.spool.accepted_tiles(image_id)

    def close(self, image_id: UUID) -> CloseManifest | None:
        raw = self.app.spool.image(image_id).close
        return decode_close(raw) if raw else None

    def settings(self, **fields: Any) -> AdapterSettings:
        """The adapter's settings for this agent, as an install would write them."""
        values: dict[str, Any] = {"edge_socket": self.socket, "finalize_grace_s": 0.05}
        return AdapterSettings(**(values | fields))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """The agent, and the process's adapter session wired to it (`root.configure`)."""
    settings = AgentSettings(
        spool_dir=tmp_path / "spool", min_free_bytes=0, local_output_root=tmp_path
    )
    app = EdgeApp(settings)
    with tempfile.TemporaryDirectory(prefix="tb-") as folder:  # a socket path is short
        socket = Path(folder) / "acquire.sock"
        app.fast_path.serve(socket)
        made = Agent(app, socket)
        root.configure(made.settings())
        try:
            yield made
        finally:
            root.close()
            for client in made.clients:
                client.close()
            app.fast_path.stop()
            app.spool.close()

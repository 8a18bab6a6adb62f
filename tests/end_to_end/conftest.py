"""End-to-end fixtures: the real programs, a real broker, a watcher on every status topic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import tifffile

from devtools.broker import Mosquitto
from devtools.stack import (
    Program,
    Watcher,
    agent_program,
    ingest_program,
    wait_for,
    wait_ingest_online,
)
from edge_agent.simulate import SyntheticScan
from tilebridge_protocol.keys import TileKey

SCAN_ARGS = ["--columns", "3", "--rows", "3", "--tile-size", "256", "--channels", "2"]
SCAN = SyntheticScan(columns=3, rows=3, tile_size=256, channels=2)
FAST_RETRY = {"commit_timeout_s": 2.0, "max_commit_timeout_s": 4.0}


@pytest.fixture
def watcher(broker: Mosquitto) -> Iterator[Watcher]:
    w = Watcher(
        broker,
        "tilebridge/v1/dev/+/status",
        "tilebridge/v1/dev/+/ack",
        "tilebridge/v1/ingest/+/status",
        "tilebridge/v1/image/+/+/status",
    )
    yield w
    w.close()


@pytest.fixture
def programs(broker: Mosquitto, tmp_path: Path) -> Iterator[dict[str, Program]]:
    """Factories' products, stopped at the end whatever happened."""
    started: dict[str, Program] = {}
    yield started
    for program in started.values():
        program.kill()


def start_ingest(
    programs: dict[str, Program], broker: Mosquitto, tmp_path: Path, **settings: Any
) -> Program:
    """Start the ingest and wait until it is subscribed (its first session starts then)."""
    program = programs.get("ingest") or ingest_program(broker, tmp_path, **settings)
    programs["ingest"] = program.start("run")
    watcher = Watcher(broker, "tilebridge/v1/ingest/+/status")
    try:
        wait_ingest_online(watcher)
    finally:
        watcher.close()
    return program


def start_scan(
    programs: dict[str, Program], broker: Mosquitto, tmp_path: Path, *extra: str, **settings: Any
) -> Program:
    program = programs.get("agent") or agent_program(broker, tmp_path, **{**FAST_RETRY, **settings})
    programs["agent"] = program.start("simulate", *SCAN_ARGS, "--timeout", "120", *extra)
    return program


def image_status(watcher: Watcher, image_id: UUID) -> dict[str, Any]:
    return watcher.latest(f"tilebridge/v1/image/scope-1/{image_id}/status") or {}


def wait_committed(watcher: Watcher, image_id: UUID, at_least: int, timeout: float = 60) -> None:
    wait_for(
        lambda: image_status(watcher, image_id).get("tiles_committed", 0) >= at_least,
        timeout,
        f"{at_least} committed tiles",
    )


def assert_archive_intact(tmp_path: Path, scan: SyntheticScan = SCAN) -> Path:
    """Exactly one archive file for the image, holding every tile exactly as acquired."""
    manifest = scan.manifest()
    files = list((tmp_path / "ingest" / "archive").rglob("*.ome.tif"))
    assert len(files) == 1, files
    shape = (
        manifest.size_t,
        manifest.size_c,
        manifest.size_z,
        manifest.tile_height,
        manifest.tile_width,
    )
    with tifffile.TiffFile(files[0]) as tif:
        assert len(tif.series) == len(manifest.positions)
        for position, series in zip(manifest.positions, tif.series, strict=True):
            data = series.asarray().reshape(shape)
            for t in range(manifest.size_t):
                for c in range(manifest.size_c):
                    for z in range(manifest.size_z):
                        expected = scan.frame(TileKey(position.index, z, c, t))
                        np.testing.assert_array_equal(data[t, c, z], expected)
    return files[0]


def ledger_tile_rows(tmp_path: Path, image_id: UUID) -> int:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(tmp_path / "ingest" / "ledger.sqlite")) as db:
        return int(
            db.execute(
                "SELECT COUNT(*) FROM tiles WHERE image_id = ?", (str(image_id),)
            ).fetchone()[0]
        )

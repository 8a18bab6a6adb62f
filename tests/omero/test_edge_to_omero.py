"""End to end into OMERO: the edge agent sends a simulated scan through a real Mosquitto to
the ingest, which writes it into the OMERO stand-in (or a real server) with the unmodified
omero-py client, next to the local archive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

from devtools.broker import Mosquitto
from devtools.stack import Watcher, wait_for
from edge_agent.app import EdgeApp
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings
from tests.edge.stack import acquire
from tests.omero.helpers import digest, expected_pixels, read_pixels, settings_for
from tilebridge_runtime.mqtt import BrokerSettings


def test_a_simulated_scan_flows_from_the_edge_into_omero(
    broker: Mosquitto, omero_target: Any, tmp_path: Path
) -> None:
    # 2 x 2 frames of 1800 px with 10 % overlap: a 3420 px canvas, above OMERO's pyramid
    # threshold (3192 x 3192), so the ingest must write tiles in OMERO's one-pass order.
    scan = SyntheticScan(columns=2, rows=2, tile_size=1800, seed=5, project="tilebridge-tests")
    manifest = scan.manifest()
    frames = {key: scan.frame(key) for key in manifest.tile_keys()}
    omero = settings_for(omero_target)
    watcher = Watcher(broker, "tilebridge/v1/#")
    ingest = IngestService(
        IngestSettings(
            broker=BrokerSettings(port=broker.port),
            data_dir=tmp_path / "ingest",
            backends=("archive", "omero"),
            omero=omero,
            status_interval_s=0.5,
        )
    ).start()
    try:
        wait_for(ingest.connection.connected.is_set, 20, "ingest connected")
        agent_settings = AgentSettings(
            broker=BrokerSettings(port=broker.port), spool_dir=tmp_path / "spool",
            min_free_bytes=0, commit_timeout_s=5,
        )  # fmt: skip
        with EdgeApp(agent_settings) as agent:
            acquire(agent, manifest, frames.__getitem__)
            ack = agent.acquisition.wait_done(manifest.image_id, 180)
    finally:
        ingest.stop()
        watcher.close()

    assert ack.server == "complete", ack
    location = ack.locations["omero"]
    assert location.startswith("omero:Image:") and " dataset:" in location
    image_id = int(location.split()[0].split(":")[2])
    conn = omero_target.connect()
    pixels = read_pixels(conn, image_id)
    assert pixels.shape[-2:] == (3420, 3420)
    assert digest(pixels) == digest(expected_pixels(manifest, frames))
    assert Path(ack.locations["archive"]).exists()
    # The OMERO password went nowhere near the broker: not in acks, not in any status.
    assert omero.password is not None
    secret = omero.password.get_secret_value()
    everything = b"".join(payload for _, payload, _ in watcher.messages)
    assert secret.encode() not in everything
    image_status = [
        json.loads(p)
        for t, p, _ in watcher.messages
        if t.startswith("tilebridge/v1/image/") and t.endswith("/status") and p
    ]
    assert image_status[-1]["phase"] == "complete"
    assert image_status[-1]["locations"]["omero"] == location

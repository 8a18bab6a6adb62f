"""`edge-agent rejected resend` (issue 13): tiles the server refused are set aside on the Pi;
once the server side is fixed, the admin queues them again and the image completes."""

from __future__ import annotations

import time
from pathlib import Path

import tifffile

from devtools.broker import Mosquitto
from edge_agent.__main__ import main
from edge_agent.app import EdgeApp
from edge_agent.settings import AgentSettings
from edge_agent.simulate import SyntheticScan
from server_ingest.app import IngestService
from server_ingest.settings import IngestSettings, Limits
from tests.edge.stack import acquire
from tilebridge_protocol.keys import TileKey
from tilebridge_runtime.mqtt import BrokerSettings


def wait(condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_refused_tiles_are_resent_by_command_after_the_fix(tmp_path: Path) -> None:
    scan = SyntheticScan(columns=2, rows=1, tile_size=96, seed=5)  # 18 KiB tiles
    manifest = scan.manifest()
    with Mosquitto(tmp_path / "broker") as broker:
        settings = AgentSettings(
            broker=BrokerSettings(port=broker.port), spool_dir=tmp_path / "spool",
            min_free_bytes=0, status_interval_s=0.5,
        )  # fmt: skip
        ingest_settings = IngestSettings(
            broker=BrokerSettings(port=broker.port), data_dir=tmp_path / "ingest",
            status_interval_s=0.5, limits=Limits(max_tile_bytes=8192),  # too small: refused
        )  # fmt: skip
        ingest = IngestService(ingest_settings).start()
        with EdgeApp(settings) as app:
            acquire(app, manifest, scan.frame)
            aside = tmp_path / "spool" / "rejected" / str(manifest.image_id)
            wait(lambda: len(list(aside.glob("tiles/*.tile"))) == manifest.tile_count)
        ingest.stop()

        # The admin raises the limit on the server, then queues the tiles again.
        fixed = ingest_settings.model_copy(update={"limits": Limits()})
        ingest = IngestService(fixed).start()
        config = tmp_path / "edge.json"
        config.write_text(settings.model_dump_json())
        assert main(["--config", str(config), "rejected", "list"]) == 0
        assert main(["--config", str(config), "rejected", "resend", str(manifest.image_id)]) == 0
        assert not list(aside.glob("tiles/*.tile"))
        assert main(["--config", str(config), "rejected", "resend", str(manifest.image_id)]) == 1
        try:
            with EdgeApp(settings):
                archive = tmp_path / "ingest" / "archive"
                wait(lambda: list(archive.rglob("*.ome.tif")))
                [path] = list(archive.rglob("*.ome.tif"))
                with tifffile.TiffFile(path) as tif:
                    for series in tif.series:
                        assert series.asarray().size == 96 * 96
                    first = tif.series[0].asarray().reshape(96, 96)
                assert (first == scan.frame(TileKey(0))).all()
        finally:
            ingest.stop()

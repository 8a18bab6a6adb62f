"""Several ingest instances on one Mosquitto (MQTT 5 shared subscription) and one PostgreSQL
ledger: every image completes exactly once, also when an instance is killed mid-scan or the
database restarts mid-scan. The real programs, real agents, real files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from devtools.broker import Mosquitto
from devtools.postgres import Postgres
from devtools.stack import Watcher, wait_for
from edge_agent.simulate import SyntheticScan
from server_ingest.claims import DEVICE
from tests.scale.cluster import Cluster
from tilebridge_protocol.keys import TileKey

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(broker: Mosquitto, pg_dsn: str, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(broker, pg_dsn, tmp_path)
    yield made
    made.stop()


def archived(workdir: Path, device: str) -> list[Path]:
    return sorted((workdir / "archive" / device).rglob("*.ome.tif"))


def assert_archived_once(workdir: Path, device: str, scan: SyntheticScan) -> None:
    """Exactly one archive file for the device's image, every tile as acquired."""
    files = archived(workdir, device)
    assert len(files) == 1, files
    m = scan.manifest()
    with tifffile.TiffFile(files[0]) as tif:
        assert len(tif.series) == len(m.positions)
        for position, series in zip(m.positions, tif.series, strict=True):
            data = series.asarray().reshape(m.size_t, m.size_c, m.size_z, m.tile_height, -1)
            for c in range(m.size_c):
                expected = scan.frame(TileKey(position.index, 0, c, 0))
                np.testing.assert_array_equal(data[0, c, 0], expected)


def assert_all_complete_once(cluster: Cluster, devices: range) -> None:
    phases = cluster.phases()
    assert sorted(d for d, _ in phases) == [f"scope-{n}" for n in devices]  # one image each
    assert set(phases.values()) == {"complete"}, phases
    for n in devices:
        assert cluster.summary(n)["state"] == "complete"
        assert_archived_once(cluster.workdir, f"scope-{n}", cluster.scan(n))


def test_three_instances_share_the_devices_and_every_image_completes_once(
    cluster: Cluster, broker: Mosquitto
) -> None:
    cluster.start_ingests("ingest-1", "ingest-2", "ingest-3")
    relays = Watcher(broker, "tilebridge/v1/ingest/+/relay/#")
    try:
        for n in range(1, 4):
            cluster.start_agent(n)
        cluster.wait_agents()
        holders = {cluster.holder(DEVICE, f"scope-{n}") for n in range(1, 4)}
        # The broker spread each device's messages over the group; the holder got them all.
        assert relays.messages, "no message ever reached an instance that did not hold it"
    finally:
        relays.close()
    assert holders <= {"ingest-1", "ingest-2", "ingest-3"} and None not in holders
    assert_all_complete_once(cluster, range(1, 4))
    assert all(count == 18 for count in cluster.tiles_recorded().values())


def test_an_instance_killed_mid_scan_leaves_its_devices_to_the_others(cluster: Cluster) -> None:
    cluster.start_ingests("ingest-1", "ingest-2", "ingest-3")
    for n in range(1, 4):
        cluster.start_agent(n, frame_delay=0.15)
    holder = wait_for(lambda: cluster.holder(DEVICE, "scope-1"), 30, "scope-1 claimed")
    wait_for(cluster.tiles_recorded, 30, "tiles committed")
    cluster.ingests[holder].kill()  # kill -9, mid-scan: its partial tiles, its images
    cluster.wait_agents()
    assert cluster.holder(DEVICE, "scope-1") not in (None, holder)
    assert_all_complete_once(cluster, range(1, 4))


def test_the_database_restarted_mid_scan_loses_nothing(
    broker: Mosquitto, postgres: Postgres, tmp_path: Path
) -> None:
    cluster = Cluster(broker, postgres.dsn, tmp_path, cluster={
        "subscription": "shared", "lease_s": 12.0,
    })  # fmt: skip
    try:
        cluster.start_ingests("ingest-1", "ingest-2")
        for n in range(1, 3):
            cluster.start_agent(n, frame_delay=0.1)
        wait_for(cluster.tiles_recorded, 30, "tiles committed")
        postgres.kill()  # as a crash: recovery at the next start
        postgres.start()
        cluster.wait_agents()
        assert all(p.running for p in cluster.ingests.values()), cluster.logs()
        assert_all_complete_once(cluster, range(1, 3))
    finally:
        cluster.stop()

"""An instance killed in the middle of an OMERO pyramid: another takes the device and the
image store over once their leases run out, deletes the partial pyramid and writes it again.
The stand-in then holds exactly one image for the scan, complete, pixel for pixel: no
duplicate, no orphan."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("omero")

from devtools.broker import Mosquitto
from devtools.stack import wait_for
from server_ingest.claims import STORE
from tests.omero.helpers import expected_pixels, settings_for
from tests.scale.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.omero]

PYRAMID = {"columns": 2, "rows": 2, "tile_size": 1800, "channels": 1}
"""A 3420 px canvas: above OMERO's pyramid threshold, written tile by tile in one pass."""


def omero_config(target: Any, workdir: Path) -> dict[str, Any]:
    secret = workdir / "omero.password"
    secret.write_text(target.password)
    os.chmod(secret, 0o600)
    config = settings_for(target).model_dump(mode="json", exclude={"password"}, exclude_none=True)
    return {**config, "password_file": str(secret)}


@pytest.fixture
def cluster(
    broker: Mosquitto, pg_dsn: str, tmp_path: Path, omero_standin: Any
) -> Iterator[Cluster]:
    made = Cluster(
        broker, pg_dsn, tmp_path, backends=["omero"], omero=omero_config(omero_standin, tmp_path)
    )
    yield made
    made.stop()


def test_an_instance_killed_mid_pyramid_is_replaced_and_nothing_is_duplicated(
    cluster: Cluster, omero_standin: Any
) -> None:
    server = omero_standin.server
    cluster.start_ingests("ingest-1", "ingest-2")
    cluster.start_agent(1, shape=PYRAMID)
    wait_for(lambda: server.set_tile_calls > 0, 120, "the pyramid being written", 0.01)
    writer = cluster.holder(STORE, "scope-1/%/omero")
    assert writer is not None
    cluster.ingests[writer].kill()
    calls_at_kill = server.set_tile_calls
    cluster.wait_agents()

    scan = cluster.scan(1, **PYRAMID)
    manifest = scan.manifest()
    mine = [
        image
        for image in server.images()
        if image.description is not None and str(manifest.image_id) in image.description.val
    ]
    assert len(mine) == 1, [i.id.val for i in mine]  # the partial one was deleted
    assert len(server.images()) == 1  # and nothing else was left behind
    image_id = mine[0].id.val
    assert server.pixel_state(image_id) == "complete"
    frames = {key: scan.frame(key) for key in manifest.tile_keys()}
    np.testing.assert_array_equal(server.pixels(image_id), expected_pixels(manifest, frames))
    assert server.set_tile_calls > calls_at_kill  # written again by the survivor
    assert cluster.summary(1)["locations"]["omero"] == f"omero:Image:{image_id}" or cluster.summary(
        1
    )["locations"]["omero"].startswith(f"omero:Image:{image_id} ")

"""Routing images to OMERO targets: the pure rule, and the settings that refuse a config
whose routes cannot work."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from server_ingest.destinations import Destinations as Router
from server_ingest.destinations import Route
from server_ingest.settings import IngestSettings
from tilebridge_storage.omero_backend.settings import OmeroSettings
from tilebridge_storage.testing.manifests import make_manifest

OMERO = OmeroSettings(host="omero.example.org", username="tb", password=SecretStr("x"))


def test_first_matching_route_wins_and_local_backends_always_come() -> None:
    router = Router(
        ["archive"],
        ["facility", "lab-b"],
        [
            Route(device="scope-b*", target="lab-b"),
            Route(experiment="plate-*", project="Lab B *", target="lab-b"),
            Route(target="facility"),
        ],
    )
    m = make_manifest()
    assert router.route("scope-b1", m).backends == ("archive", "lab-b")
    lab_b = m.model_copy(update={"experiment": "plate-7", "project": "Lab B screens"})
    assert router.route("scope-1", lab_b).target == "lab-b"
    assert router.route("scope-1", m).backends == ("archive", "facility")


def test_one_target_without_routes_takes_every_image_and_a_gap_is_a_problem() -> None:
    m = make_manifest()
    assert Router(["archive"], ["omero"]).route("any", m).backends == ("archive", "omero")
    gap = Router(["archive"], ["a", "b"], [Route(device="x", target="a")]).route("y", m)
    assert gap.problem and "no OMERO route for device y" in gap.problem
    assert Router(["archive"], []).route("any", m).backends == ("archive",)


def test_settings_refuse_routes_that_cannot_work() -> None:
    with pytest.raises(ValidationError, match="unknown OMERO targets"):
        IngestSettings(
            backends=("archive", "omero"), omero_targets={"a": OMERO}, routes=[{"target": "b"}]
        )
    with pytest.raises(ValidationError, match="not both"):
        IngestSettings(backends=("archive", "omero"), omero=OMERO, omero_targets={"a": OMERO})
    with pytest.raises(ValidationError, match="only with 'omero'"):
        IngestSettings(backends=("archive",), omero_targets={"a": OMERO})
    ok = IngestSettings(
        backends=("archive", "omero"), omero_targets={"a": OMERO}, routes=[{"target": "a"}]
    )
    assert ok.routes == (Route(target="a"),)

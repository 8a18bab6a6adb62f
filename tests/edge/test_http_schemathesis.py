"""Property-based: requests generated from the agent's own OpenAPI schema never get a
server error (5xx). Runs in process against the ASGI app (no network, no broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from edge_agent.app import EdgeApp
from edge_agent.http import create_app
from edge_agent.models import ExperimentSpec
from edge_agent.settings import AgentSettings


@pytest.mark.slow
def test_no_request_makes_the_agent_fail(tmp_path: Path) -> None:
    agent = EdgeApp(
        AgentSettings(spool_dir=tmp_path / "spool", min_free_bytes=0, local_output_root=tmp_path)
    )
    out = tmp_path / "out"
    agent.config.update({"output_dir": str(out), "write_zarr": True, "write_stitched_tiff": True})
    api = create_app(agent.acquisition, agent.config, agent.reporter, agent.receiving,
                     allowed_hosts=("*",))  # fmt: skip
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    spec = {"experiment": "fuzz", "tile_width": 8, "tile_height": 8, "pixel_size_um": 1.0,
            "positions": [{"x_um": 0, "y_um": 0}, {"x_um": 8, "y_um": 0}]}  # fmt: skip
    known = str(agent.acquisition.start(ExperimentSpec(**spec)).image_id)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    try:
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=40,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            )
            def no_server_error(case: Any) -> None:
                if isinstance(case.body, dict) and "output_dir" in case.body:
                    # Any absolute path is valid; keep what this test writes in its folder.
                    case.body["output_dir"] = str(out)
                if "image_id" in (case.path_parameters or {}):
                    # A random id only finds 404; a real experiment reaches the handlers.
                    case.path_parameters["image_id"] = known
                data = getattr(case.body, "data", case.body)  # schemathesis wraps binary
                if isinstance(data, bytes) and len(data) % 2 == 0:
                    # Half the frames get the right size, so the metadata checks are reached.
                    case.body = bytes(8 * 8 * 2)
                    (case.headers or {}).pop("x-frame-metadata", None)
                case.call_and_validate(checks=[not_a_server_error])

            no_server_error()
    finally:
        agent.spool.close()


def test_the_schema_documents_every_endpoint(tmp_path: Path) -> None:
    agent = EdgeApp(AgentSettings(spool_dir=tmp_path / "spool", min_free_bytes=0))
    api = create_app(agent.acquisition, agent.config, agent.reporter, agent.receiving, token="t")
    openapi = api.openapi()
    agent.spool.close()
    assert set(openapi["paths"]) >= {
        "/config", "/getOMEWriterConfig", "/setOMEWriterConfig", "/experiments",
        "/experiments/{image_id}", "/experiments/{image_id}/frames",
        "/experiments/{image_id}/finalize", "/experiments/{image_id}/abort", "/status",
    }  # fmt: skip
    frames = openapi["paths"]["/experiments/{image_id}/frames"]["post"]
    assert "application/octet-stream" in frames["requestBody"]["content"]
    assert {p["name"] for p in frames["parameters"]} >= {"tile_index", "x_um", "channel"}
    config = openapi["paths"]["/setOMEWriterConfig"]["post"]["requestBody"]["content"]
    assert config["application/json"]["schema"]["$ref"] == "#/components/schemas/OMEWriterConfig"

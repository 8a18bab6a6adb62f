"""The example configurations and the compose file load with the settings they are for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from edge_agent.settings import AgentSettings
from server_ingest.dashboard.settings import DashboardSettings
from server_ingest.settings import IngestSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_examples_load_with_their_settings() -> None:
    edge = AgentSettings.load(DEPLOY / "edge.example.json")
    ingest = IngestSettings.load(DEPLOY / "ingest.example.json")
    dashboard = DashboardSettings.load(DEPLOY / "dashboard.example.json")
    # Devices reach the broker over TLS with their own identity; services over loopback.
    assert edge.broker.tls and edge.broker.port == 8883
    assert edge.broker.username == edge.device_id
    assert edge.broker.password is None and ingest.broker.password is None
    assert ingest.broker.username == "ingest" and dashboard.broker.username == "monitor"
    assert ingest.broker.host == dashboard.broker.host == "127.0.0.1"
    assert dashboard.listen_host == "127.0.0.1"
    assert edge.metrics_port and ingest.metrics_port


def test_examples_hold_no_secret() -> None:
    for path in DEPLOY.glob("*.example.json"):
        broker = json.loads(path.read_text())["broker"]
        assert "password" not in broker, f"{path.name}: use password_file or a credential"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_services_and_omero_variables() -> None:
    services = compose()["services"]
    assert set(services) == {
        "database",
        "omeroserver",
        "omeroweb",
        "mosquitto",
        "ingest",
        "dashboard",
    }
    server_env = services["omeroserver"]["environment"]
    # The variables the openmicroscopy/omero-server image documents.
    assert {
        "CONFIG_omero_db_host",
        "CONFIG_omero_db_user",
        "CONFIG_omero_db_pass",
        "CONFIG_omero_db_name",
        "ROOTPASS",
    } <= set(server_env)
    assert server_env["CONFIG_omero_db_host"] == "database"
    assert services["omeroweb"]["environment"]["OMEROHOST"] == "omeroserver"
    database = services["database"]["environment"]
    assert database["POSTGRES_USER"] == server_env["CONFIG_omero_db_user"]
    assert database["POSTGRES_DB"] == server_env["CONFIG_omero_db_name"]
    assert database["POSTGRES_PASSWORD"] == server_env["CONFIG_omero_db_pass"]
    # No default passwords: compose refuses to start until deploy/.env sets them.
    for value in (database["POSTGRES_PASSWORD"], server_env["ROOTPASS"]):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), value
    env_example = (DEPLOY / "compose.env.example").read_text()
    for variable in ("POSTGRES_PASSWORD", "OMERO_ROOT_PASSWORD"):
        assert f"{variable}=" in env_example


def test_compose_files_exist_and_configs_load() -> None:
    data = compose()
    services = data["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                generated = "/broker" in source  # made by the admin (docs/deploy.md, step 2)
                assert generated or (DEPLOY / source).exists(), f"{name}: {source}"
    build = services["ingest"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert services["dashboard"]["image"] == services["ingest"]["image"]

    ingest = IngestSettings.load(DEPLOY / "compose" / "ingest.json")
    dashboard = DashboardSettings.load(DEPLOY / "compose" / "dashboard.json")
    assert ingest.broker.host == dashboard.broker.host == "mosquitto"
    assert dashboard.listen_host == "0.0.0.0"
    assert services["dashboard"]["ports"] == [
        f"127.0.0.1:{dashboard.listen_port}:{dashboard.listen_port}"
    ]
    for name, prefix in (("ingest", "TILEBRIDGE_INGEST_"), ("dashboard", "TILEBRIDGE_DASHBOARD_")):
        service = services[name]
        (secret,) = service["secrets"]
        assert service["environment"] == {
            f"{prefix}BROKER__PASSWORD_FILE": f"/run/secrets/{secret['target']}"
        }
        assert secret["source"] in data["secrets"]

    broker_conf = (DEPLOY / "compose" / "mosquitto.conf").read_text()
    assert (
        "allow_anonymous false" in broker_conf
        and "include_dir /mosquitto/config/conf.d" in broker_conf
    )
    assert any(
        v.startswith("../mosquitto/tilebridge.conf:") for v in services["mosquitto"]["volumes"]
    )


def test_compose_dockerfile_installs_the_ingest_extra() -> None:
    dockerfile = (DEPLOY / "compose" / "ingest.Dockerfile").read_text()
    assert '"/src[ingest]"' in dockerfile and "omero" not in dockerfile.lower().replace(
        "omero-py", ""
    )
    assert "\nUSER tilebridge\n" in dockerfile
    example = json.loads((DEPLOY / "compose" / "ingest.json").read_text())
    assert "password" not in json.dumps(example["broker"])


def test_the_compose_image_holds_every_package_the_programs_import(tmp_path: Path) -> None:
    """Issue 13: the image lacked tilebridge_runtime. Lay out exactly what the Dockerfile
    copies and import both programs from it alone."""
    import re
    import shutil
    import subprocess
    import sys

    repo = DEPLOY.parent
    dockerfile = (DEPLOY / "compose" / "ingest.Dockerfile").read_text()
    copied = [
        name
        for line in re.findall(r"^COPY (.+) /src/?\S*$", dockerfile, flags=re.M)
        for name in line.split()
    ]
    for name in copied:
        source = repo / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    assert "README.md" in copied  # pyproject's readme: the build fails without it
    result = subprocess.run(
        [sys.executable, "-I", "-c",
         # The venv's editable install of this checkout would find anything: drop it.
         "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
         "if 'editable' not in getattr(f, '__module__', '')]; "
         "sys.path[:0] = [sys.argv[1]]; "
         "import server_ingest.__main__, server_ingest.app, server_ingest.dashboard.server",
         str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

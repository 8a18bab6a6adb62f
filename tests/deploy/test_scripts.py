"""deploy/install-edge.sh and deploy/install-server.sh: clean shell, and the right plan.

They change a whole machine (packages, users, services), so here they only run with DRY_RUN=1,
which prints every command instead of running it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRIPTS = [
    DEPLOY / "install-edge.sh",
    DEPLOY / "install-server.sh",
    DEPLOY / "install-broker-config.sh",
]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install shellcheck")
def test_shellcheck_passes() -> None:
    result = subprocess.run(
        ["shellcheck", "--severity=style", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_and_strict() -> None:
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text


PLAN_USER = "tb-plan-nobody"


def plan(script: str, *args: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(DEPLOY / script), *args],
        capture_output=True,
        text=True,
        check=True,
        # A service user that cannot exist here, so the plan does not depend on this machine.
        env={**os.environ, "DRY_RUN": "1", "SERVICE_USER": PLAN_USER},
    )
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_edge_install_plan_installs_only_the_edge_extra(tmp_path: Path) -> None:
    steps = plan("install-edge.sh", str(tmp_path / "src"))
    pip = [s for s in steps if "/pip install" in s and "--upgrade pip" not in s]
    assert pip == [f"/opt/tilebridge/venv/bin/pip install --upgrade {tmp_path / 'src'}[edge]"]
    assert not any("omero" in s.lower() for s in steps)
    assert any(s.startswith("useradd --system") and s.endswith(f" {PLAN_USER}") for s in steps)
    assert (
        "install -m 0644 "
        + str(DEPLOY / "systemd/tilebridge-edge.service")
        + (" /etc/systemd/system/tilebridge-edge.service")
        in steps
    )
    assert f"install -d -m 0750 -o root -g {PLAN_USER} /etc/tilebridge-edge" in steps


def test_server_install_plan(tmp_path: Path) -> None:
    steps = plan("install-server.sh", str(tmp_path / "src"))
    repo = DEPLOY.parent
    assert any(s.startswith("apt-get install") and " mosquitto " in f"{s} " for s in steps)
    assert (
        f"/opt/tilebridge/venv/bin/pip install --upgrade {tmp_path / 'src'}[ingest] "
        "fastapi uvicorn" in steps
    )
    assert (
        f"install -m 0644 {repo}/mosquitto/tilebridge.conf "
        "/etc/mosquitto/conf.d/tilebridge.conf" in steps
    )
    assert (
        f"install -m 0644 {repo}/mosquitto/mosquitto.conf "
        "/etc/mosquitto/conf.d/tilebridge-listeners.conf" in steps
    )
    # Service identities come from the admin command; passwords only into root-only files.
    assert (
        "server-ingest device add ingest --role ingest (password to "
        "/etc/tilebridge/credentials/ingest-mqtt-password)" in steps
    )
    assert (
        "server-ingest device add monitor --role monitor (password to "
        "/etc/tilebridge/credentials/dashboard-mqtt-password)" in steps
    )
    assert "install -d -m 0700 /etc/tilebridge/credentials" in steps
    for unit in ("tilebridge-ingest.service", "tilebridge-dashboard.service"):
        assert f"install -m 0644 {DEPLOY}/systemd/{unit} /etc/systemd/system/{unit}" in steps


def test_credential_paths_agree_between_script_and_units() -> None:
    script = (DEPLOY / "install-server.sh").read_text()
    for unit, credential in [
        ("tilebridge-ingest.service", "ingest-mqtt-password"),
        ("tilebridge-dashboard.service", "dashboard-mqtt-password"),
    ]:
        assert (
            f"/etc/tilebridge/credentials/{credential}" in (DEPLOY / "systemd" / unit).read_text()
        )
        assert f'"$ETC/credentials/{credential}"' in script


def test_both_venvs_come_from_the_system_interpreter(tmp_path: Path) -> None:
    for script in ("install-edge.sh", "install-server.sh"):
        assert "/usr/bin/python3 -m venv /opt/tilebridge/venv" in plan(script, str(tmp_path))


def test_the_server_install_makes_the_archive_folder_for_the_service(tmp_path: Path) -> None:
    steps = plan("install-server.sh", str(tmp_path))
    assert f"install -d -m 0750 -o {PLAN_USER} -g {PLAN_USER} /srv/tilebridge" in steps


def broker_config(etc: Path) -> list[str]:
    result = subprocess.run(
        ["bash", str(DEPLOY / "install-broker-config.sh")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MOSQUITTO_ETC": str(etc), "BROKER_GROUP": "root", "DRY_RUN": "0"},
    )
    return result.stdout.splitlines()


def test_the_broker_config_twice_keeps_an_edited_listener_file_and_changes_nothing(
    tmp_path: Path,
) -> None:
    etc = tmp_path / "mosquitto"
    listeners = etc / "conf.d" / "tilebridge-listeners.conf"
    traffic = etc / "conf.d" / "tilebridge.conf"
    first = broker_config(etc)
    assert sorted(first) == sorted(
        f"changed: {p}"
        for p in (traffic, listeners, etc / "tilebridge" / "acl", etc / "tilebridge" / "passwd")
    )
    assert broker_config(etc) == []  # run again: nothing changed, nothing to restart

    edited = listeners.read_text().replace("listener 8883", "listener 8884")
    listeners.write_text(edited)
    (etc / "tilebridge" / "acl").write_text("# the site's ACL\n")
    traffic.write_text("# an old release's limits\n")
    again = broker_config(etc)
    assert listeners.read_text() == edited  # the admin's edit stays
    assert (etc / "conf.d" / "tilebridge-listeners.conf.dist").read_text() == (
        DEPLOY.parent / "mosquitto" / "mosquitto.conf"
    ).read_text()
    assert (etc / "tilebridge" / "acl").read_text() == "# the site's ACL\n"
    assert traffic.read_text() == (DEPLOY.parent / "mosquitto" / "tilebridge.conf").read_text()
    assert again == [
        f"changed: {traffic}",
        f"kept: {listeners} (edited here; the repository's version is {listeners}.dist)",
    ]

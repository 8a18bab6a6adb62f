"""The systemd units in deploy/systemd/: valid for systemd, restarting, sandboxed.

`systemd-analyze verify` refuses a unit whose ExecStart= binary does not exist, and the real
ones (/opt/tilebridge/venv/bin/...) exist only on an installed host. The test copies the units
to a temporary directory with that prefix replaced by a directory of stand-in executables.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
VENV_BIN = "/opt/tilebridge/venv/bin"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="apt-get install systemd"
)


def unit(path: Path) -> configparser.RawConfigParser:
    # strict=False: systemd allows a key more than once (SystemCallFilter=).
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.fixture
def staged(tmp_path: Path) -> list[Path]:
    """The units with ExecStart= pointing at stand-in executables that do exist."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("edge-agent", "server-ingest"):
        fake = bin_dir / name
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    staged = []
    for path in UNITS:
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace(VENV_BIN, str(bin_dir)))
        staged.append(copy)
    return staged


def test_the_three_units_exist() -> None:
    assert [p.name for p in UNITS] == [
        "tilebridge-dashboard.service",
        "tilebridge-edge.service",
        "tilebridge-ingest.service",
    ]


def test_systemd_analyze_verify_accepts_the_units(staged: list[Path]) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, staged)],
        capture_output=True,
        text=True,
        check=False,
    )
    # verify only warns about unknown keys or sections, so any output is a failure.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("index", range(3))
def test_units_are_sandboxed(staged: list[Path], index: int) -> None:
    path = staged[index]
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={MAX_EXPOSURE * 10:.0f}",
            "--no-pager",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert level is not None, result.stdout + result.stderr
    assert float(level.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_restart_run_unprivileged_and_keep_secrets_out_of_config(path: Path) -> None:
    service = unit(path)["Service"]
    assert service["Restart"] == "on-failure"
    assert service.get("DynamicUser") == "yes" or service.get("User") == "tilebridge"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == value, f"{path.name}: {key}"
    execstart = service["ExecStart"].split()
    assert execstart[0].startswith(VENV_BIN + "/")
    config = Path(execstart[execstart.index("--config") + 1])
    assert config.parent in (Path("/etc/tilebridge"), Path("/etc/tilebridge-edge"))
    if "LoadCredential" in service:
        name, source = service["LoadCredential"].split(":", 1)
        assert source.startswith("/etc/tilebridge/credentials/")
        assert re.fullmatch(
            r"TILEBRIDGE_[A-Z]+_BROKER__PASSWORD_FILE=%d/" + name, service["Environment"]
        )


def test_state_directories_match_the_default_data_paths() -> None:
    from edge_agent.settings import AgentSettings
    from server_ingest.settings import IngestSettings

    edge = unit(DEPLOY / "systemd" / "tilebridge-edge.service")["Service"]
    ingest = unit(DEPLOY / "systemd" / "tilebridge-ingest.service")["Service"]
    state = Path("/var/lib")
    assert AgentSettings().spool_dir.is_relative_to(state / edge["StateDirectory"])
    assert IngestSettings().data_dir == state / ingest["StateDirectory"]

"""What `pip install '<source>[ingest]'` puts on a server must include the dashboard's page.

The install scripts install from a source tree or a wheel, not in editable mode, so files
that are not Python modules reach the host only if the package data says so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tilebridge_protocol", "tilebridge_storage", "edge_agent", "server_ingest")


@pytest.mark.slow
def test_wheel_ships_the_dashboard_static_files(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("tilebridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = REPO / "server_ingest" / "dashboard" / "static"
    missing = [
        f"server_ingest/dashboard/static/{p.name}"
        for p in static.iterdir()
        if f"server_ingest/dashboard/static/{p.name}" not in names
    ]
    assert not missing, (
        f"{missing} not in the wheel: pyproject.toml [tool.setuptools.package-data] needs "
        '"server_ingest.dashboard" = ["static/*"]'
    )

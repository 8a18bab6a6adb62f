"""The chaos runner's tests: its parts one by one, then a short seeded run of the whole."""

import os

import pytest

from tests.omero_standin.fixtures import import_omero_quietly

import_omero_quietly()


@pytest.fixture
def root() -> None:
    """Mounting the runner's small filesystems needs root (make test runs as root here)."""
    if os.geteuid() != 0:
        pytest.skip("the chaos runner mounts tmpfs disks: run as root")

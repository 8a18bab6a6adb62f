"""OMERO backend tests. They run against the stand-in, or against a real server when
TILEBRIDGE_OMERO_HOST (and _PORT, _USER, _PASSWORD, _GROUP) are set:

    TILEBRIDGE_OMERO_HOST=omero.example.org ... .venv/bin/python -m pytest -m omero

Tests that need the stand-in's fault hooks skip themselves on a real server.
"""

from pathlib import Path

import pytest

from tests.omero_standin.fixtures import (  # noqa: F401 - fixtures are used by name
    import_omero_quietly,
    omero_standin,
    omero_standin_factory,
    omero_target,
)

import_omero_quietly()


HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.omero)

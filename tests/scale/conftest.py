"""Scale-out fixtures: one real PostgreSQL server for the session (devtools.postgres), a
fresh database in it for every test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.postgres import Postgres

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.remove()


@pytest.fixture
def pg_dsn(postgres_server: Postgres) -> str:
    """A connection string to a database of this test's own."""
    name = f"test_{next(_numbers)}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return postgres_server.dsn.replace("dbname=tilebridge", f"dbname={name}")


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[Postgres]:
    """A PostgreSQL server of this test's own (to kill or restart it)."""
    server = Postgres(tmp_path / "postgres").start()
    yield server
    server.remove()


from tests.omero_standin.fixtures import (  # noqa: E402, F401 - fixtures are used by name
    import_omero_quietly,
    omero_standin,
    omero_standin_factory,
)

import_omero_quietly()

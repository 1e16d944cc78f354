"""Fixtures of the fast tests: SQLite files and scratch PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from harness import PG_ADMIN_URL, service_up
from sessionflow.config import Config
from sessionflow.store.sql import SQLStore

# The contract suite is a package of test mixins: its failures show values, as tests' do.
pytest.register_assert_rewrite("store_contract")

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_HOST = "127.0.0.1:5432"


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def require_postgres() -> None:
    """Skip locally without PostgreSQL; under CI=true its absence is a failure."""
    if service_up("postgres"):
        return
    if CI:
        pytest.fail(f"CI=true but PostgreSQL is not reachable on {PG_HOST}")
    pytest.skip(f"PostgreSQL not running on {PG_HOST} (with CI=true this is an error)")


@pytest.fixture
def make_pg_url() -> Iterator[Callable[[], str]]:
    """Creates empty scratch databases on demand; drops them afterwards."""
    require_postgres()
    created: list[str] = []

    def make() -> str:
        name = f"sfunit_{uuid.uuid4().hex[:12]}"
        _pg_admin(f"CREATE DATABASE {name}")
        created.append(name)
        return f"postgresql+psycopg://{PG_HOST}/{name}"

    yield make
    for name in created:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def pg_module_url() -> Iterator[str]:
    """One scratch PostgreSQL database for a test module, upgraded to the head revision."""
    require_postgres()
    name = f"sfunit_{uuid.uuid4().hex[:12]}"
    _pg_admin(f"CREATE DATABASE {name}")
    _pg_admin(f"ALTER DATABASE {name} SET synchronous_commit = off")  # a scratch database
    url = f"postgresql+psycopg://{PG_HOST}/{name}"
    try:
        SQLStore(Config(database_url=url)).upgrade()
        yield url
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

"""Alembic environment for the sessionflow store.

Run through ``sessionflow db upgrade`` (or automatically for SQLite); the caller
passes an open connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from sessionflow.store.sql.models import Base

VERSION_TABLE = "sf_alembic_version"


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("set sqlalchemy.url or pass a connection")
        with create_engine(url).begin() as conn:
            _migrate(conn)
        return
    _migrate(connection)


def _migrate(connection) -> None:  # type: ignore[no-untyped-def]
    if connection.dialect.name == "postgresql":
        # Two processes upgrading at once: the second waits, then finds nothing to do.
        connection.execute(text("SELECT pg_advisory_xact_lock(7312026)"))
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()

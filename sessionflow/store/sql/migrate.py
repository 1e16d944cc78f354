"""Apply the Alembic migrations that ship inside the package."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

VERSION_TABLE = "sf_alembic_version"


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """An Alembic config whose scripts are the packaged ``sessionflow.migrations``."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("sessionflow.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade the schema on ``connection`` (inside the caller's transaction)."""
    command.upgrade(alembic_config(connection), revision)

"""Apply the Alembic migrations that ship inside the package.

Alembic is imported on first use, not with the store: a web process's first
``request_session`` would otherwise pay ~120 ms importing it on the request's thread
(the schema check runs later, on the thread that first touches the database).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

VERSION_TABLE = "sf_alembic_version"


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """An Alembic config whose scripts are the packaged ``sessionflow.migrations``."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("sessionflow.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def is_known(revision: str | None) -> bool:
    """Whether the packaged scripts know ``revision`` (``None``: an empty database)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if revision is None:
        return True
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade the schema on ``connection`` (inside the caller's transaction)."""
    from alembic import command

    command.upgrade(alembic_config(connection), revision)

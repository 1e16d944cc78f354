"""The store's schema under ``manage.py migrate``: the packaged Alembic scripts.

Migration ``0001`` of this app runs them when it is applied, and after every later
``migrate`` (Django's ``post_migrate`` signal) the store is brought to the revision
this sessionflow needs, so a new sessionflow release needs no new Django migration.
Only the database that holds the store does anything: the ``DATABASE`` alias, or
``default`` for a store given by URL.
"""

from __future__ import annotations

from typing import Any

from ... import ops
from ...store.sql import migrate
from .conf import check_values, store_config, user_settings


def store_alias_for(alias: str) -> bool:
    """Whether migrating the database ``alias`` concerns the store."""
    from django.db import DEFAULT_DB_ALIAS

    values = user_settings()
    check_values(values)
    if values.get("MIGRATE", True) is False:
        return False
    return bool(alias == values.get("DATABASE", DEFAULT_DB_ALIAS))


def upgrade(alias: str) -> tuple[str | None, str] | None:
    """Upgrade the store if ``alias`` holds it: ``(revision before, revision now)``,
    or None when there is nothing to do here."""
    if not store_alias_for(alias):
        return None
    config = store_config()
    if config is None:
        return None
    try:
        before = ops.db_current(config)["revision"]
    except Exception:
        before = None  # no schema yet (or no SQLite file yet): the upgrade creates it
    if before == migrate.head_revision():
        return before, before
    return before, ops.db_upgrade(config)["revision"]


def run_python_upgrade(apps: Any, schema_editor: Any) -> None:
    """``RunPython`` step of migration 0001."""
    upgrade(schema_editor.connection.alias)


def on_post_migrate(sender: Any, using: str = "default", plan: Any = None, **kwargs: Any) -> None:
    """After ``migrate`` (not after ``flush``, which sends the signal without a plan)."""
    if plan is None:
        return
    done = upgrade(using)
    verbosity = int(kwargs.get("verbosity", 1))
    if done is not None and done[0] != done[1] and verbosity >= 1:
        stdout = kwargs.get("stdout")
        message = f"  sessionflow: session store upgraded from {done[0] or 'nothing'} to {done[1]}"
        if stdout is not None:
            stdout.write(message + "\n")
        else:
            print(message)

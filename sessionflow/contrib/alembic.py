"""Keep Alembic autogenerate away from the session store's tables.

An app whose own Alembic migrations (or Flask-Migrate's) run against the database
that also holds the session store would see the store's tables as unknown, and
autogenerate would emit a ``drop_table`` for each. Pass these hooks to
``context.configure`` in the app's ``env.py`` (or to ``Migrate(app, db, ...)``)::

    from sessionflow.contrib.alembic import include_name
    context.configure(..., include_name=include_name)

Every table of the store is named ``sf_*`` (its version table ``sf_alembic_version``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

TABLE_PREFIX = "sf_"

IncludeName = Callable[[str | None, str, Mapping[str, str | None]], bool]
IncludeObject = Callable[[Any, str | None, str, bool, Any], bool]


def is_store_table(name: str | None) -> bool:
    """Whether ``name`` is a table of the session store."""
    return bool(name) and str(name).startswith(TABLE_PREFIX)


def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """Alembic's ``include_name`` hook: never reflect the store's tables (nor their indexes
    and constraints), so autogenerate neither drops nor alters them."""
    if type_ == "table":
        return not is_store_table(name)
    table = parent_names.get("table_name")
    return not is_store_table(table)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's ``include_object`` hook, for setups that filter objects rather than names
    (Alembic before 1.5): leaves out the store's tables and everything on them."""
    if type_ == "table":
        return not is_store_table(name)
    table = getattr(obj, "table", None)
    return not is_store_table(getattr(table, "name", None))


def chain_include_name(other: IncludeName | None) -> IncludeName:
    """``include_name`` that also asks ``other`` (an app's own hook), if there is one."""
    if other is None or other is include_name:
        return include_name

    def combined(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
        return include_name(name, type_, parent_names) and bool(other(name, type_, parent_names))

    combined.sessionflow_chained = True  # type: ignore[attr-defined]
    return combined


__all__ = ["TABLE_PREFIX", "chain_include_name", "include_name", "include_object", "is_store_table"]

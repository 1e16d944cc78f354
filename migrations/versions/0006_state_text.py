"""SQLite: state values are stored as JSON text, exactly as written.

A column declared ``JSON`` has NUMERIC affinity in SQLite, so a value whose JSON text
looks like a number was converted on the way in: ``2.0`` and ``-0.0`` came back as
the integers 2 and 0, an integer beyond 64 bits as an inexact float. ``sf_state.value``
becomes TEXT (no conversion). Rows already converted are rewritten from what SQLite
holds (an integer or a float, read at full precision: SQLite's own CAST of a float to
text keeps 15 digits). PostgreSQL keeps its ``json`` column, which was always exact.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_NUMBERS = sa.text(
    "SELECT scope, scope_id, key, value FROM sf_state"
    " WHERE typeof(value) IN ('integer', 'real')"
)
_REWRITE = sa.text(
    "UPDATE sf_state SET value = :value WHERE scope = :scope AND scope_id = :scope_id"
    " AND key = :key"
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    numbers = [row._mapping for row in bind.execute(_NUMBERS)]
    _rebuild(sa.Text, sa.JSON)
    for row in numbers:
        bind.execute(_REWRITE, {**row, "value": json.dumps(row["value"])})


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    _rebuild(sa.JSON, sa.Text)


def _rebuild(new: type[sa.types.TypeEngine], old: type[sa.types.TypeEngine]) -> None:
    """SQLite rebuilds the table; the sf_dispatches trigger that writes sf_state (0004)
    names it, which a rename checks unless in legacy mode (the trigger is unchanged)."""
    op.execute("PRAGMA legacy_alter_table = ON")
    try:
        with op.batch_alter_table("sf_state") as batch:
            batch.alter_column("value", type_=new, existing_type=old, existing_nullable=True)
    finally:
        op.execute("PRAGMA legacy_alter_table = OFF")

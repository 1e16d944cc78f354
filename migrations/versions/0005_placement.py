"""Placement: worker capacities and labels, and what each session asked for.

- sf_workers: ``resources`` (declared capacities, ``{"gpu": 2}``) and ``labels``
  (``{"zone": "eu"}``), written at start and with every heartbeat.
- sf_sessions: ``requires``, ``constraints``, ``prefer`` (canonical JSON) and
  ``placement`` (``spread``/``pack``), so that any process can add up a worker's
  usage from its open sessions and place a moving session by the same rules.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sf_workers") as batch:
        batch.add_column(sa.Column("resources", sa.JSON))
        batch.add_column(sa.Column("labels", sa.JSON))
    with op.batch_alter_table("sf_sessions") as batch:
        batch.add_column(sa.Column("requires", sa.JSON))
        batch.add_column(sa.Column("constraints", sa.JSON))
        batch.add_column(sa.Column("prefer", sa.JSON))
        batch.add_column(sa.Column("placement", sa.String(8)))


def downgrade() -> None:
    with op.batch_alter_table("sf_sessions") as batch:
        batch.drop_column("placement")
        batch.drop_column("prefer")
        batch.drop_column("constraints")
        batch.drop_column("requires")
    with op.batch_alter_table("sf_workers") as batch:
        batch.drop_column("labels")
        batch.drop_column("resources")

"""Session options: heartbeat timeout, TTL, idle timeout, turns, restart, affinity, merging.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sf_sessions") as batch:
        batch.add_column(
            sa.Column("heartbeat_timeout", sa.Float, nullable=False, server_default="10")
        )
        batch.add_column(sa.Column("ttl", sa.Float))
        batch.add_column(sa.Column("idle_timeout", sa.Float))
        batch.add_column(sa.Column("max_turns", sa.Integer))
        batch.add_column(
            sa.Column("survive_restart", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("affinity", sa.String(8), nullable=False, server_default="hard"))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("recreated_from", sa.String(64)))
        batch.add_column(sa.Column("target_worker", sa.String(255)))
        batch.add_column(
            sa.Column("merge_policy", sa.String(32), nullable=False,
                      server_default="last_write_wins")
        )
        batch.add_column(sa.Column("reducers", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("sf_sessions") as batch:
        for column in (
            "reducers", "merge_policy", "target_worker", "recreated_from", "expires_at", "affinity", "survive_restart",
            "max_turns", "idle_timeout", "ttl", "heartbeat_timeout",
        ):
            batch.drop_column(column)

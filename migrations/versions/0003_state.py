"""Session state (scoped key/value rows with integer versions), parallel branches, task runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sf_state",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("scope_id", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("value", sa.JSON),
        sa.Column("size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "sf_branch_groups",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("sf_sessions.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("finished", sa.Integer, nullable=False, server_default="0"),
        sa.Column("snapshot_taken", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("snapshot", sa.JSON),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("conflict", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "sf_branch_members",
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column(
            "group_id",
            sa.String(64),
            sa.ForeignKey("sf_branch_groups.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("member", sa.Integer, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ops", sa.JSON),
    )
    op.create_table(
        "sf_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("sf_sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("task_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(255)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_sf_runs_session_started", "sf_runs", ["session_id", "started_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_sf_runs_session_started", table_name="sf_runs")
    op.drop_table("sf_runs")
    op.drop_table("sf_branch_members")
    op.drop_table("sf_branch_groups")
    op.drop_table("sf_state")

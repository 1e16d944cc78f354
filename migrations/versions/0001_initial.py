"""Workers, sessions and the tasks dispatched through them.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sf_workers",
        sa.Column("nodename", sa.String(255), primary_key=True),
        sa.Column("queue", sa.String(300), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("max_sessions", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("last_heartbeat_at", TS, nullable=False),
    )
    op.create_table(
        "sf_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64)),
        sa.Column("hostname", sa.String(255)),
        sa.Column("queue", sa.String(300)),
        sa.Column("user_id", sa.String(255)),
        sa.Column("agent_id", sa.String(255)),
        sa.Column("metadata", sa.JSON),
        sa.Column("creation_timeout", sa.Float, nullable=False),
        sa.Column("execution_timeout", sa.Float, nullable=False),
        sa.Column("turns", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("opened_at", TS),
        sa.Column("deadline_at", TS),
        sa.Column("closed_at", TS),
        sa.Column("last_activity_at", TS),
    )
    op.create_index("ix_sf_sessions_status", "sf_sessions", ["status"])
    op.create_index("ix_sf_sessions_hostname", "sf_sessions", ["hostname"])
    op.create_index("ix_sf_sessions_user_id", "sf_sessions", ["user_id"])
    op.create_table(
        "sf_session_tasks",
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("sf_sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("worker", sa.String(255)),
        sa.Column("dispatched_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
    )
    op.create_index("ix_sf_session_tasks_session_id", "sf_session_tasks", ["session_id"])


def downgrade() -> None:
    op.drop_table("sf_session_tasks")
    op.drop_table("sf_sessions")
    op.drop_table("sf_workers")

"""The 0.2 engine: runs written by the worker's writer, settlement, leases, dispatch in one statement.

- sf_runs: ``attempt`` (Celery's retries) with a unique (session, task, attempt) for upserts;
  ``finished_at`` empty while a run is in progress; an index of unfinished runs per worker.
- sf_sessions: ``settled_at`` (the end of a session settles its tasks once) and an index
  on (hostname, status) and on closed_at (retention).
- sf_workers: ``host``, to tell a restart from a second process with the same node name.
- sf_branch_members: keyed by (group, member, step); written when a step finishes.
- sf_leases (the one sweeper), sf_meta (the generated signing key).
- SQLite only: sf_dispatches and its triggers, so that registering a dispatch (turns,
  task rows, branch groups with their snapshot) is one statement, as PostgreSQL does
  with a data-modifying WITH.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

SQLITE_DISPATCH = [
    """
    CREATE TABLE sf_dispatches (
        id INTEGER PRIMARY KEY,
        session_id VARCHAR(64) NOT NULL,
        n INTEGER NOT NULL,
        tasks TEXT NOT NULL,
        groups TEXT NOT NULL,
        at DATETIME NOT NULL
    )
    """,
    # Refuse (insert nothing, RETURNING yields no row) unless the session is open and
    # has turns left. SQLite runs one writer at a time, so the check cannot race.
    """
    CREATE TRIGGER sf_dispatch_check BEFORE INSERT ON sf_dispatches
    BEGIN
        SELECT RAISE(IGNORE) WHERE NOT EXISTS (
            SELECT 1 FROM sf_sessions
            WHERE id = NEW.session_id AND status = 'open'
              AND (max_turns IS NULL OR turns + NEW.n <= max_turns)
        );
    END
    """,
    """
    CREATE TRIGGER sf_dispatch_apply AFTER INSERT ON sf_dispatches
    BEGIN
        UPDATE sf_sessions SET turns = turns + NEW.n WHERE id = NEW.session_id;
        INSERT OR IGNORE INTO sf_session_tasks (task_id, session_id, name, state, dispatched_at)
            SELECT json_extract(value, '$[0]'), NEW.session_id, json_extract(value, '$[1]'),
                   'pending', NEW.at
            FROM json_each(NEW.tasks);
        INSERT INTO sf_branch_groups
            (id, session_id, size, finished, snapshot_taken, snapshot, status, created_at)
            SELECT json_extract(g.value, '$[0]'), NEW.session_id, json_extract(g.value, '$[1]'),
                   0, json_extract(g.value, '$[2]'),
                   CASE WHEN json_extract(g.value, '$[2]') THEN (
                       SELECT coalesce(json_group_object(s.key, json(s.value)), '{}')
                       FROM sf_state s
                       WHERE s.scope = 'session' AND s.scope_id = NEW.session_id
                         AND NOT s.deleted
                   ) ELSE '{}' END,
                   'open', NEW.at
            FROM json_each(NEW.groups) g;
        DELETE FROM sf_dispatches WHERE id = NEW.id;
    END
    """,
]


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("sf_runs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default="0"))
        batch.alter_column("finished_at", existing_type=TS, nullable=True)
    # Runs of 0.1 have no attempt number: their row id keeps them apart.
    op.execute("UPDATE sf_runs SET attempt = id")
    op.create_index(
        "ix_sf_runs_task_attempt", "sf_runs", ["session_id", "task_id", "attempt"], unique=True
    )
    op.create_index(
        "ix_sf_runs_unfinished",
        "sf_runs",
        ["worker"],
        sqlite_where=sa.text("finished_at IS NULL"),
        postgresql_where=sa.text("finished_at IS NULL"),
    )

    with op.batch_alter_table("sf_sessions") as batch:
        batch.add_column(sa.Column("settled_at", TS))
    op.execute("UPDATE sf_sessions SET settled_at = closed_at WHERE status IN ('closed', 'failed')")
    op.create_index("ix_sf_sessions_hostname_status", "sf_sessions", ["hostname", "status"])
    op.create_index("ix_sf_sessions_closed_at", "sf_sessions", ["closed_at"])

    with op.batch_alter_table("sf_workers") as batch:
        batch.add_column(sa.Column("host", sa.String(255)))

    # 0.1 wrote every member at dispatch; 0.2 writes a step when it ends. Groups still
    # in flight during the upgrade do not merge (upgrade with no session running).
    op.drop_table("sf_branch_members")
    op.create_table(
        "sf_branch_members",
        sa.Column(
            "group_id",
            sa.String(64),
            sa.ForeignKey("sf_branch_groups.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("member", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ops", sa.JSON),
    )
    op.create_table(
        "sf_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_table(
        "sf_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    if sqlite:
        for statement in SQLITE_DISPATCH:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS sf_dispatch_apply")
        op.execute("DROP TRIGGER IF EXISTS sf_dispatch_check")
        op.execute("DROP TABLE IF EXISTS sf_dispatches")
    op.drop_table("sf_meta")
    op.drop_table("sf_leases")
    op.drop_table("sf_branch_members")
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
    with op.batch_alter_table("sf_workers") as batch:
        batch.drop_column("host")
    op.drop_index("ix_sf_sessions_closed_at", "sf_sessions")
    op.drop_index("ix_sf_sessions_hostname_status", "sf_sessions")
    with op.batch_alter_table("sf_sessions") as batch:
        batch.drop_column("settled_at")
    op.drop_index("ix_sf_runs_unfinished", "sf_runs")
    op.drop_index("ix_sf_runs_task_attempt", "sf_runs")
    op.execute("DELETE FROM sf_runs WHERE finished_at IS NULL")
    with op.batch_alter_table("sf_runs") as batch:
        batch.alter_column("finished_at", existing_type=TS, nullable=False)
        batch.drop_column("attempt")

"""SQLAlchemy 2.0 models of the session store.

The schema is created and changed only by the Alembic migrations in
``migrations/``; these classes describe it for queries. A test compares them
with what the migrations build.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ...enums import SessionStatus


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database (SQLite keeps naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the session store")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Worker(Base):
    """A ``celery worker`` process that runs sessions, by nodename."""

    __tablename__ = "sf_workers"

    nodename: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str | None] = mapped_column(String(255))
    queue: Mapped[str] = mapped_column(String(300))
    pid: Mapped[int] = mapped_column(Integer)
    max_sessions: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    last_heartbeat_at: Mapped[datetime]
    resources: Mapped[dict[str, Any] | None]  # declared capacities, {"gpu": 2}
    labels: Mapped[dict[str, Any] | None]


class SessionRow(Base):
    """A session: pending until a worker admits it, then open, then closed or failed."""

    __tablename__ = "sf_sessions"
    __table_args__ = (
        Index("ix_sf_sessions_hostname_status", "hostname", "status"),
        Index("ix_sf_sessions_closed_at", "closed_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(64))
    hostname: Mapped[str | None] = mapped_column(String(255), index=True)
    queue: Mapped[str | None] = mapped_column(String(300))
    user_id: Mapped[str | None] = mapped_column(String(255), index=True)
    agent_id: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    creation_timeout: Mapped[float] = mapped_column(Float)
    execution_timeout: Mapped[float] = mapped_column(Float)
    turns: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    opened_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    last_activity_at: Mapped[datetime | None]
    heartbeat_timeout: Mapped[float] = mapped_column(Float, default=10.0)
    ttl: Mapped[float | None] = mapped_column(Float)
    idle_timeout: Mapped[float | None] = mapped_column(Float)
    max_turns: Mapped[int | None] = mapped_column(Integer)
    survive_restart: Mapped[bool] = mapped_column(Boolean, default=False)
    affinity: Mapped[str] = mapped_column(String(8), default="hard")
    expires_at: Mapped[datetime | None]
    recreated_from: Mapped[str | None] = mapped_column(String(64))
    target_worker: Mapped[str | None] = mapped_column(String(255))
    merge_policy: Mapped[str] = mapped_column(String(32), default="last_write_wins")
    reducers: Mapped[dict[str, Any] | None]
    settled_at: Mapped[datetime | None]
    requires: Mapped[dict[str, Any] | None]  # placement, canonical (sessionflow.resources)
    constraints: Mapped[dict[str, Any] | None]
    prefer: Mapped[Any] = mapped_column(JSON, nullable=True)
    placement: Mapped[str | None] = mapped_column(String(8))


class SessionTask(Base):
    """A task registered when it was sent through a session.

    ``state`` is ``pending`` until the session's end settles it (``cancelled``,
    ``lost``); what it did in between is in its runs.
    """

    __tablename__ = "sf_session_tasks"

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("sf_sessions.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str | None] = mapped_column(String(255))
    dispatched_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


workers = cast(Table, Worker.__table__)
sessions = cast(Table, SessionRow.__table__)
#: ``sf_sessions.status`` of an ended session.
ENDED = (SessionStatus.CLOSED.value, SessionStatus.FAILED.value)
session_tasks = cast(Table, SessionTask.__table__)


class StateEntry(Base):
    """One state key of a scope: ``session`` (id), ``user`` (user_id) or ``app`` ("")."""

    __tablename__ = "sf_state"

    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    size: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(BigInteger)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime]


class BranchGroup(Base):
    """A group or chord header dispatched in a session: its members are branches."""

    __tablename__ = "sf_branch_groups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("sf_sessions.id", ondelete="CASCADE"), index=True
    )
    size: Mapped[int] = mapped_column(Integer)
    finished: Mapped[int] = mapped_column(Integer, default=0)
    snapshot_taken: Mapped[bool] = mapped_column(Boolean, default=False)
    snapshot: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(16))
    conflict: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime]
    merged_at: Mapped[datetime | None]


class BranchMember(Base):
    """One finished (or failed) step of a branch; ``ops`` are its ordered state operations."""

    __tablename__ = "sf_branch_members"

    group_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("sf_branch_groups.id", ondelete="CASCADE"), primary_key=True
    )
    member: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    ops: Mapped[Any] = mapped_column(JSON, nullable=True)


class Run(Base):
    """One execution of a session task (retries and failures included).

    Written by the worker's writer: at its start (``finished_at`` empty) when it
    runs longer than a flush, and at its end.
    """

    __tablename__ = "sf_runs"
    __table_args__ = (
        Index("ix_sf_runs_session_started", "session_id", "started_at", "id"),
        Index("ix_sf_runs_task_attempt", "session_id", "task_id", "attempt", unique=True),
        Index(
            "ix_sf_runs_unfinished",
            "worker",
            sqlite_where=text("finished_at IS NULL"),
            postgresql_where=text("finished_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("sf_sessions.id", ondelete="CASCADE")
    )
    task_id: Mapped[str] = mapped_column(String(255))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    name: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """A cluster-wide role one process holds at a time (the sweeper), until ``expires_at``."""

    __tablename__ = "sf_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime]


class Meta(Base):
    """Values the store keeps for every process (the generated signing key)."""

    __tablename__ = "sf_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


state_entries = cast(Table, StateEntry.__table__)
branch_groups = cast(Table, BranchGroup.__table__)
branch_members = cast(Table, BranchMember.__table__)
runs = cast(Table, Run.__table__)
leases = cast(Table, Lease.__table__)
meta = cast(Table, Meta.__table__)

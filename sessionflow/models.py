"""SQLAlchemy 2.0 models of the session store.

The schema is created and changed only by the Alembic migrations in
``migrations/``; these classes describe it for queries.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
    queue: Mapped[str] = mapped_column(String(300))
    pid: Mapped[int] = mapped_column(Integer)
    max_sessions: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    last_heartbeat_at: Mapped[datetime]


class SessionRow(Base):
    """A session: pending until a worker admits it, then open, then closed or failed."""

    __tablename__ = "sf_sessions"

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


class SessionTask(Base):
    """A task dispatched through a session, from dispatch until it finishes."""

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


workers = Worker.__table__
sessions = SessionRow.__table__
session_tasks = SessionTask.__table__

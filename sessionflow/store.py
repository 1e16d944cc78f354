"""The session store: every SQL statement sessionflow runs, behind one small class.

Engines are created per process (they never cross a fork). Conditional
``UPDATE … WHERE status = …`` statements decide every race.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    Engine,
    RowMapping,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from . import migrate
from .config import Config
from .errors import StoreError
from .models import session_tasks, sessions, workers

PENDING, OPEN, CLOSED, FAILED = "pending", "open", "closed", "failed"
TASK_PENDING, TASK_STARTED = "pending", "started"
TASK_SUCCEEDED, TASK_FAILED, TASK_CANCELLED = "succeeded", "failed", "cancelled"
UNFINISHED_TASK_STATES = (TASK_PENDING, TASK_STARTED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Store:
    """SQL access for sessions, workers and session tasks."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._write_engine: Engine | None = None
        self._read_engine: Engine | None = None

    # -- engines --------------------------------------------------------

    def _engines(self) -> tuple[Engine, Engine]:
        pid = os.getpid()
        if self._pid == pid and self._write_engine is not None and self._read_engine is not None:
            return self._write_engine, self._read_engine
        with self._lock:
            if self._pid != pid or self._write_engine is None or self._read_engine is None:
                for inherited in {self._write_engine, self._read_engine} - {None}:
                    assert inherited is not None
                    inherited.dispose(close=False)  # the parent process keeps its sockets
                self._write_engine, self._read_engine = self._create_engines()
                self._pid = pid
                self._prepare_schema(self._write_engine)
        return self._write_engine, self._read_engine

    def _create_engines(self) -> tuple[Engine, Engine]:
        url = self.config.database_url
        try:
            if not self.config.is_sqlite:
                engine = create_engine(url, pool_pre_ping=True)
                return engine, engine
            return _sqlite_engine(url, immediate=True), _sqlite_engine(url, immediate=False)
        except Exception as exc:  # bad URL, missing driver
            raise StoreError(
                f"cannot use sessionflow_database_url {url!r}: {exc}. "
                "Check the URL and that its database driver is installed."
            ) from exc

    def _prepare_schema(self, engine: Engine) -> None:
        head = migrate.head_revision()
        try:
            with engine.begin() as conn:
                current = migrate.current_revision(conn)
                if current == head:
                    return
                if self.config.is_sqlite and self.config.auto_migrate:
                    migrate.upgrade(conn)
                    return
        except DBAPIError as exc:
            raise StoreError(
                f"cannot reach the session store at {engine.url!r}: {exc.orig}. "
                "Is the database running and the URL right?"
            ) from exc
        raise StoreError(
            f"the session store at {engine.url!r} is at schema revision {current!r}, "
            f"this sessionflow needs {head!r}: run `sessionflow db upgrade --url URL` "
            "(or `-A yourapp`) first"
        )

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        engine = self._engines()[0]
        try:
            with engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreError(f"session store write failed: {exc.orig}") from exc

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        engine = self._engines()[1]
        try:
            with engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreError(f"session store read failed: {exc.orig}") from exc

    def dispose(self) -> None:
        """Close this process's connections (used by tests and the CLI)."""
        with self._lock:
            for engine in {self._write_engine, self._read_engine} - {None}:
                assert engine is not None
                engine.dispose()
            self._write_engine = self._read_engine = None
            self._pid = None

    def upgrade(self) -> str:
        """Apply pending migrations; returns the revision now in force."""
        engine = self._engines_unchecked()
        with engine.begin() as conn:
            migrate.upgrade(conn)
            rev = migrate.current_revision(conn)
        assert rev is not None
        return rev

    def _engines_unchecked(self) -> Engine:
        return self._create_engines()[0]

    # -- sessions ---------------------------------------------------------

    def create_pending(self, values: dict[str, Any]) -> None:
        with self._write() as conn:
            conn.execute(insert(sessions).values(status=PENDING, turns=0, **values))

    def get_session(self, session_id: str) -> RowMapping | None:
        with self._read() as conn:
            return (
                conn.execute(select(sessions).where(sessions.c.id == session_id)).mappings().first()
            )

    def get_status(self, session_id: str) -> str | None:
        with self._read() as conn:
            value: str | None = conn.execute(
                select(sessions.c.status).where(sessions.c.id == session_id)
            ).scalar()
            return value

    def list_sessions(
        self, status: str | None, user_id: str | None, hostname: str | None
    ) -> Sequence[RowMapping]:
        query = select(sessions).where(sessions.c.status != PENDING)
        if status is not None:
            query = query.where(sessions.c.status == status)
        if user_id is not None:
            query = query.where(sessions.c.user_id == user_id)
        if hostname is not None:
            query = query.where(sessions.c.hostname == hostname)
        with self._read() as conn:
            return conn.execute(query.order_by(sessions.c.created_at)).mappings().all()

    def abandon_pending(self, session_id: str, reason: str) -> bool:
        """Mark a request nobody admitted as failed; False if a worker admitted it first."""
        with self._write() as conn:
            result = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.status == PENDING)
                .values(status=FAILED, reason=reason, closed_at=utcnow())
            )
            return result.rowcount == 1

    def admit(self, session_id: str, nodename: str, queue: str, cap: int) -> tuple[str, int]:
        """Open a pending session on ``nodename``.

        Returns ('admitted' | 'full' | 'gone', open sessions on the worker afterwards).
        """
        now = utcnow()
        with self._write() as conn:
            open_count = self._count_open(conn, nodename)
            if open_count >= cap:
                return "full", open_count
            row = conn.execute(
                select(sessions.c.execution_timeout).where(
                    sessions.c.id == session_id, sessions.c.status == PENDING
                )
            ).first()
            if row is None:
                return "gone", open_count
            conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.status == PENDING)
                .values(
                    status=OPEN,
                    hostname=nodename,
                    queue=queue,
                    opened_at=now,
                    last_activity_at=now,
                    deadline_at=now + timedelta(seconds=row.execution_timeout),
                )
            )
            return "admitted", open_count + 1

    def count_open(self, nodename: str) -> int:
        with self._read() as conn:
            return self._count_open(conn, nodename)

    @staticmethod
    def _count_open(conn: Connection, nodename: str) -> int:
        count: int = conn.execute(
            select(func.count())
            .select_from(sessions)
            .where(sessions.c.hostname == nodename, sessions.c.status == OPEN)
        ).scalar_one()
        return count

    def register_tasks(
        self, session_id: str, tasks: Sequence[tuple[str, str | None]]
    ) -> str | None:
        """Record tasks about to be sent; returns the session's queue, or None if not open."""
        now = utcnow()
        rows = [
            {
                "task_id": tid,
                "session_id": session_id,
                "name": name,
                "state": TASK_PENDING,
                "dispatched_at": now,
            }
            for tid, name in tasks
        ]
        with self._write() as conn:
            queue: str | None = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.status == OPEN)
                .values(turns=sessions.c.turns + len(rows), last_activity_at=now)
                .returning(sessions.c.queue)
            ).scalar()
            if queue is not None and rows:
                conn.execute(insert(session_tasks), rows)
        return queue

    def forget_tasks(self, task_ids: Sequence[str]) -> None:
        """Drop registrations of tasks that could not be sent."""
        with self._write() as conn:
            conn.execute(delete(session_tasks).where(session_tasks.c.task_id.in_(task_ids)))

    def end_session(
        self, session_id: str, status: str, reason: str, from_states: Sequence[str] = (OPEN,)
    ) -> list[str] | None:
        """Close or fail a session; returns the ids of its tasks that will now never run.

        Returns None when the session was not in ``from_states`` (someone else ended it).
        """
        now = utcnow()
        with self._write() as conn:
            result = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.status.in_(from_states))
                .values(status=status, reason=reason, closed_at=now)
            )
            if result.rowcount != 1:
                return None
            return self._cancel_pending_tasks(conn, session_id, now)

    @staticmethod
    def _cancel_pending_tasks(conn: Connection, session_id: str, now: datetime) -> list[str]:
        ids = list(
            conn.execute(
                select(session_tasks.c.task_id).where(
                    session_tasks.c.session_id == session_id,
                    session_tasks.c.state == TASK_PENDING,
                )
            ).scalars()
        )
        if ids:
            conn.execute(
                update(session_tasks)
                .where(
                    session_tasks.c.session_id == session_id, session_tasks.c.state == TASK_PENDING
                )
                .values(state=TASK_CANCELLED, finished_at=now)
            )
        return ids

    def expire_sessions(self, nodename: str) -> list[tuple[str, list[str]]]:
        """Close the open sessions of ``nodename`` past their execution deadline."""
        now = utcnow()
        with self._read() as conn:
            due = list(
                conn.execute(
                    select(sessions.c.id).where(
                        sessions.c.hostname == nodename,
                        sessions.c.status == OPEN,
                        sessions.c.deadline_at <= now,
                    )
                ).scalars()
            )
        ended = []
        for session_id in due:
            cancelled = self.end_session(session_id, CLOSED, "execution_timeout")
            if cancelled is not None:
                ended.append((session_id, cancelled))
        return ended

    # -- session tasks ----------------------------------------------------

    def task_started(self, session_id: str, task_id: str, name: str, worker: str) -> bool:
        """Mark a task started if its session is still open; False means: do not run it."""
        now = utcnow()
        session_open = exists().where(sessions.c.id == session_id, sessions.c.status == OPEN)
        with self._write() as conn:
            result = conn.execute(
                update(session_tasks)
                .where(
                    session_tasks.c.task_id == task_id,
                    session_tasks.c.state.in_(UNFINISHED_TASK_STATES),
                    session_open,
                )
                .values(state=TASK_STARTED, started_at=now, worker=worker, name=name)
            )
            if result.rowcount == 1:
                return True
            known = conn.execute(
                select(session_tasks.c.state).where(session_tasks.c.task_id == task_id)
            ).first()
            if known is not None or not conn.execute(select(session_open)).scalar():
                return False
            # Sent with the session's headers but not through Session.apply_async
            # (e.g. Task.replace): adopt it while the session is open.
            conn.execute(
                insert(session_tasks).values(
                    task_id=task_id,
                    session_id=session_id,
                    name=name,
                    state=TASK_STARTED,
                    worker=worker,
                    dispatched_at=now,
                    started_at=now,
                )
            )
            return True

    def task_finished(self, task_id: str, state: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(session_tasks)
                .where(session_tasks.c.task_id == task_id)
                .values(state=state, finished_at=utcnow() if state != TASK_PENDING else None)
            )

    def task_states(self, session_id: str) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute(
                select(session_tasks.c.task_id, session_tasks.c.state).where(
                    session_tasks.c.session_id == session_id
                )
            ).all()
        return {r.task_id: r.state for r in rows}

    # -- workers ----------------------------------------------------------

    def register_worker(self, nodename: str, queue: str, pid: int, max_sessions: int) -> None:
        now = utcnow()
        values = {
            "queue": queue,
            "pid": pid,
            "max_sessions": max_sessions,
            "status": "online",
            "started_at": now,
            "last_heartbeat_at": now,
        }
        with self._write() as conn:
            result = conn.execute(
                update(workers).where(workers.c.nodename == nodename).values(**values)
            )
            if result.rowcount == 0:
                conn.execute(insert(workers).values(nodename=nodename, **values))

    def heartbeat(self, nodename: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(workers)
                .where(workers.c.nodename == nodename)
                .values(last_heartbeat_at=utcnow(), status="online")
            )

    def worker_offline(self, nodename: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(workers).where(workers.c.nodename == nodename).values(status="offline")
            )

    def get_worker(self, nodename: str) -> RowMapping | None:
        with self._read() as conn:
            return (
                conn.execute(select(workers).where(workers.c.nodename == nodename))
                .mappings()
                .first()
            )


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event emits BEGIN below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front so two writers never deadlock on upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine

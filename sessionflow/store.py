"""The session store: every SQL statement sessionflow runs, behind one small class.

Engines are created per process (they never cross a fork). Conditional
``UPDATE … WHERE status = …`` statements decide every race.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    Engine,
    RowMapping,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    or_,
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
MOVING = "moving"  # reason of a pending session that is changing workers (soft affinity)
TASK_PENDING, TASK_STARTED = "pending", "started"
TASK_SUCCEEDED, TASK_FAILED, TASK_CANCELLED = "succeeded", "failed", "cancelled"
TASK_LOST = "lost"
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
        write, read = self._create_engines()
        try:
            with write.begin() as conn:
                migrate.upgrade(conn)
                rev = migrate.current_revision(conn)
        except DBAPIError as exc:
            raise StoreError(
                f"cannot upgrade the session store at {self.config.database_url!r}: {exc.orig}. "
                "Is the database running and the URL right?"
            ) from exc
        finally:
            for engine in {write, read}:
                engine.dispose()
        assert rev is not None
        return rev

    # -- sessions ---------------------------------------------------------

    def create_pending(self, values: dict[str, Any]) -> None:
        with self._write() as conn:
            conn.execute(insert(sessions).values(status=PENDING, turns=0, **values))

    def get_session(self, session_id: str, with_heartbeat: bool = False) -> RowMapping | None:
        """A session row; ``with_heartbeat`` adds its worker's ``last_heartbeat_at``."""
        query = select(sessions).where(sessions.c.id == session_id)
        if with_heartbeat:
            query = (
                select(sessions, workers.c.last_heartbeat_at)
                .select_from(sessions.outerjoin(workers, workers.c.nodename == sessions.c.hostname))
                .where(sessions.c.id == session_id)
            )
        with self._read() as conn:
            return conn.execute(query).mappings().first()

    def get_status(self, session_id: str) -> str | None:
        with self._read() as conn:
            value: str | None = conn.execute(
                select(sessions.c.status).where(sessions.c.id == session_id)
            ).scalar()
            return value

    def list_sessions(
        self, status: str | None, user_id: str | None, hostname: str | None
    ) -> Sequence[RowMapping]:
        moving = and_(sessions.c.status == PENDING, sessions.c.reason == MOVING)
        query = select(sessions).where(or_(sessions.c.status != PENDING, moving))
        if status == OPEN:
            query = query.where(or_(sessions.c.status == OPEN, moving))
        elif status is not None:
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
        A request addressed to another worker (recreate) counts as 'gone' here.
        """
        now = utcnow()
        with self._write() as conn:
            open_count = self._count_open(conn, nodename)
            if open_count >= cap:
                return "full", open_count
            row = conn.execute(
                select(
                    sessions.c.execution_timeout,
                    sessions.c.ttl,
                    sessions.c.created_at,
                    sessions.c.target_worker,
                    sessions.c.reason,
                    sessions.c.opened_at,
                    sessions.c.deadline_at,
                ).where(sessions.c.id == session_id, sessions.c.status == PENDING)
            ).first()
            if row is None or row.target_worker not in (None, nodename):
                return "gone", open_count
            moving = row.reason == MOVING
            values: dict[str, Any] = {
                "status": OPEN,
                "hostname": nodename,
                "queue": queue,
                "reason": None,
                "last_activity_at": now,
            }
            if not moving:  # a moved session keeps its clocks
                values.update(
                    opened_at=now,
                    deadline_at=now + timedelta(seconds=row.execution_timeout),
                    expires_at=None
                    if row.ttl is None
                    else row.created_at + timedelta(seconds=row.ttl),
                )
            result = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.status == PENDING)
                .values(**values)
            )
            if result.rowcount != 1:  # abandoned (creation timeout) a moment ago
                return "gone", open_count
            return ("moved" if moving else "admitted"), open_count + 1

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
        """Record tasks about to be sent; returns the session's queue.

        Returns None, recording nothing, if the session is not open or the tasks
        would take it past ``max_turns``.
        """
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
                _TAKE_TURNS, {"b_sid": session_id, "b_n": len(rows), "b_now": now}
            ).scalar()
            if queue is not None and rows:
                conn.execute(_INSERT_TASKS, rows)
        return queue

    def forget_tasks(self, task_ids: Sequence[str]) -> None:
        """Drop registrations of tasks that could not be sent."""
        with self._write() as conn:
            conn.execute(delete(session_tasks).where(session_tasks.c.task_id.in_(task_ids)))

    def end_session(
        self,
        session_id: str,
        status: str,
        reason: str,
        *,
        from_states: Sequence[str] = (OPEN,),
        hostname: str | None = None,
        lose_started: bool = False,
    ) -> Ended | None:
        """Close or fail a session and settle its unfinished tasks in one transaction.

        Tasks not started yet become 'cancelled'; with ``lose_started`` (its worker
        process died) running ones become 'lost'. Returns None when the session was
        not in ``from_states`` on ``hostname`` (someone else ended or moved it).
        """
        now = utcnow()
        condition = [sessions.c.id == session_id, sessions.c.status.in_(from_states)]
        if hostname is not None:
            condition.append(sessions.c.hostname == hostname)
        with self._write() as conn:
            result = conn.execute(
                update(sessions)
                .where(*condition)
                .values(status=status, reason=reason, closed_at=now)
            )
            if result.rowcount != 1:
                return None
            cancelled = self._settle_tasks(conn, session_id, TASK_PENDING, TASK_CANCELLED, now)
            lost = (
                self._settle_tasks(conn, session_id, TASK_STARTED, TASK_LOST, now)
                if lose_started
                else []
            )
        return Ended(session_id, status, reason, cancelled, lost)

    @staticmethod
    def _settle_tasks(
        conn: Connection, session_id: str, from_state: str, to_state: str, now: datetime
    ) -> list[str]:
        # One statement: a task that starts meanwhile is either settled here or started.
        return list(
            conn.execute(
                update(session_tasks)
                .where(
                    session_tasks.c.session_id == session_id, session_tasks.c.state == from_state
                )
                .values(state=to_state, finished_at=now)
                .returning(session_tasks.c.task_id)
            ).scalars()
        )

    def lose_started_tasks(self, nodename: str) -> list[Ended]:
        """At worker start: tasks an earlier process of ``nodename`` was running are lost."""
        with self._write() as conn:
            rows = conn.execute(
                update(session_tasks)
                .where(session_tasks.c.worker == nodename, session_tasks.c.state == TASK_STARTED)
                .values(state=TASK_LOST, finished_at=utcnow())
                .returning(session_tasks.c.task_id, session_tasks.c.session_id)
            ).all()
        by_session: dict[str, list[str]] = {}
        for row in rows:
            by_session.setdefault(row.session_id, []).append(row.task_id)
        return [Ended(sid, OPEN, "worker_restarted", [], ids) for sid, ids in by_session.items()]

    def lose_missing_tasks(
        self, session_id: str, present: set[str], before: datetime
    ) -> Ended | None:
        """Pending tasks dispatched before ``before`` whose messages are gone: lost."""
        condition = [
            session_tasks.c.session_id == session_id,
            session_tasks.c.state == TASK_PENDING,
            session_tasks.c.dispatched_at <= before,
        ]
        if present:
            condition.append(session_tasks.c.task_id.not_in(sorted(present)))
        with self._write() as conn:
            lost = list(
                conn.execute(
                    update(session_tasks)
                    .where(*condition)
                    .values(state=TASK_LOST, finished_at=utcnow())
                    .returning(session_tasks.c.task_id)
                ).scalars()
            )
        return Ended(session_id, OPEN, "worker_lost", [], lost) if lost else None

    def begin_move(self, session_id: str, hostname: str) -> Ended | None:
        """Soft affinity: detach a session from its lost worker until another admits it.

        Its running tasks are lost; its queued ones stay pending and follow it.
        """
        now = utcnow()
        with self._write() as conn:
            result = conn.execute(
                update(sessions)
                .where(
                    sessions.c.id == session_id,
                    sessions.c.status == OPEN,
                    sessions.c.hostname == hostname,
                )
                .values(
                    status=PENDING, reason=MOVING, hostname=None, queue=None, last_activity_at=now
                )
            )
            if result.rowcount != 1:
                return None
            lost = self._settle_tasks(conn, session_id, TASK_STARTED, TASK_LOST, now)
        return Ended(session_id, FAILED, "worker_lost", [], lost)

    def stalled_moves(self) -> list[str]:
        """Moving sessions no worker admitted within their creation_timeout."""
        now = utcnow()
        with self._read() as conn:
            rows = conn.execute(
                select(
                    sessions.c.id, sessions.c.last_activity_at, sessions.c.creation_timeout
                ).where(sessions.c.status == PENDING, sessions.c.reason == MOVING)
            ).all()
        return [
            r.id for r in rows if r.last_activity_at + timedelta(seconds=r.creation_timeout) <= now
        ]

    def open_sessions(self, nodename: str) -> Sequence[RowMapping]:
        """The open sessions of a worker, with the columns lifecycle checks need."""
        with self._read() as conn:
            return (
                conn.execute(
                    select(
                        sessions.c.id,
                        sessions.c.heartbeat_timeout,
                        sessions.c.survive_restart,
                        sessions.c.affinity,
                        sessions.c.deadline_at,
                        sessions.c.expires_at,
                        sessions.c.idle_timeout,
                        sessions.c.last_activity_at,
                    ).where(sessions.c.hostname == nodename, sessions.c.status == OPEN)
                )
                .mappings()
                .all()
            )

    def idle_since(self, session_id: str, last_dispatch: datetime | None) -> datetime | None:
        """When the session last had work; None while one of its tasks is running."""
        with self._read() as conn:
            row = conn.execute(
                select(
                    func.count().filter(session_tasks.c.state == TASK_STARTED),
                    func.max(session_tasks.c.finished_at),
                ).where(session_tasks.c.session_id == session_id)
            ).one()
        if row[0]:
            return None
        finished = row[1]
        if finished is not None and finished.tzinfo is None:
            finished = finished.replace(tzinfo=timezone.utc)
        moments = [m for m in (last_dispatch, finished) if m is not None]
        return max(moments) if moments else None

    # -- session tasks ----------------------------------------------------

    def task_started(self, session_id: str, task_id: str, name: str, worker: str) -> str | None:
        """Mark a task started if its session is still open; returns the session's queue.

        None means: the session is not open, do not run the task.
        """
        now = utcnow()
        session_open = exists().where(sessions.c.id == session_id, sessions.c.status == OPEN)
        with self._write() as conn:
            queue: str | None = conn.execute(
                _START_TASK,
                {
                    "b_tid": task_id,
                    "b_sid": session_id,
                    "b_now": now,
                    "b_worker": worker,
                    "b_name": name,
                },
            ).scalar()
            if queue is not None:
                return queue
            known = conn.execute(
                select(session_tasks.c.state).where(session_tasks.c.task_id == task_id)
            ).first()
            if known is not None or not conn.execute(select(session_open)).scalar():
                return None
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
            adopted: str | None = conn.execute(
                select(sessions.c.queue).where(sessions.c.id == session_id)
            ).scalar()
            return adopted

    def task_finished(self, task_id: str, state: str) -> None:
        finished_at = utcnow() if state != TASK_PENDING else None
        with self._write() as conn:
            conn.execute(_FINISH_TASK, {"b_tid": task_id, "b_state": state, "b_at": finished_at})

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
        values = {"queue": queue, "pid": pid, "max_sessions": max_sessions, "status": "online"}
        with self._write() as conn:
            now = self._db_now(conn)
            result = conn.execute(
                update(workers)
                .where(workers.c.nodename == nodename)
                .values(started_at=now, last_heartbeat_at=now, **values)
            )
            if result.rowcount == 0:
                conn.execute(
                    insert(workers).values(
                        nodename=nodename, started_at=now, last_heartbeat_at=now, **values
                    )
                )

    def heartbeat(self, nodename: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(workers)
                .where(workers.c.nodename == nodename)
                .values(last_heartbeat_at=self._db_now(conn), status="online")
            )

    def worker_offline(self, nodename: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(workers).where(workers.c.nodename == nodename).values(status="offline")
            )

    def silent_workers(self, min_age: float) -> list[tuple[str, float, str]]:
        """Workers with open sessions whose last heartbeat is older than ``min_age`` s.

        Returns (nodename, seconds since the last heartbeat, status) measured on the
        database's clock, so clocks of other machines do not matter.
        """
        with self._read() as conn:
            now = self._db_now(conn)
            rows = conn.execute(
                select(workers.c.nodename, workers.c.last_heartbeat_at, workers.c.status).where(
                    workers.c.last_heartbeat_at < now - timedelta(seconds=min_age),
                    exists().where(
                        sessions.c.hostname == workers.c.nodename, sessions.c.status == OPEN
                    ),
                )
            ).all()
        return [
            (r.nodename, (now - _aware(r.last_heartbeat_at)).total_seconds(), r.status)
            for r in rows
        ]

    def _db_now(self, conn: Connection) -> datetime:
        if conn.dialect.name == "postgresql":
            value: datetime = conn.execute(select(func.now())).scalar_one()
            return _aware(value)
        return utcnow()


# The statements every session task runs, built once: constructing a Core statement
# per call costs more than executing it on SQLite.
_TAKE_TURNS = (
    update(sessions)
    .where(
        sessions.c.id == bindparam("b_sid"),
        sessions.c.status == OPEN,
        or_(
            sessions.c.max_turns.is_(None),
            sessions.c.turns + bindparam("b_n") <= sessions.c.max_turns,
        ),
    )
    .values(turns=sessions.c.turns + bindparam("b_n"), last_activity_at=bindparam("b_now"))
    .returning(sessions.c.queue)
)
_INSERT_TASKS = insert(session_tasks)
_START_TASK = (
    update(session_tasks)
    .where(
        session_tasks.c.task_id == bindparam("b_tid"),
        session_tasks.c.state.in_(UNFINISHED_TASK_STATES),
        exists().where(sessions.c.id == bindparam("b_sid"), sessions.c.status == OPEN),
    )
    .values(
        state=TASK_STARTED,
        started_at=bindparam("b_now"),
        worker=bindparam("b_worker"),
        name=bindparam("b_name"),
    )
    .returning(
        select(sessions.c.queue).where(sessions.c.id == bindparam("b_sid")).scalar_subquery()
    )
)
_FINISH_TASK = (
    update(session_tasks)
    .where(session_tasks.c.task_id == bindparam("b_tid"))
    .values(state=bindparam("b_state"), finished_at=bindparam("b_at"))
)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Ended:
    """A session that was just ended, and what became of its unfinished tasks."""

    session_id: str
    status: str
    reason: str
    cancelled: list[str]
    lost: list[str]


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

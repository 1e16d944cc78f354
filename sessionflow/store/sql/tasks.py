"""Task registrations, runs and history in SQL.

Registering a dispatch is one statement on both databases: PostgreSQL takes the
turns, inserts the task rows and the branch groups in one data-modifying WITH;
SQLite inserts one row into ``sf_dispatches`` whose triggers do the same (see
migration 0004).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from ...enums import RUN_FINAL_STATES, RUN_LOST, RUN_STARTED, Reason, SessionStatus, TaskStatus
from ...records import Dispatch, Ended, Run, RunRecord, TaskRecord, utcnow
from .engine import Engines
from .models import UTCDateTime, branch_groups, runs, session_tasks, sessions

T, R, S = session_tasks.c, runs.c, sessions.c
_FINAL = tuple(RUN_FINAL_STATES)
_ENDED = (SessionStatus.CLOSED.value, SessionStatus.FAILED.value)

_dispatches = Table(  # SQLite only; its triggers do the work
    "sf_dispatches",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("session_id", String(64)),
    Column("n", Integer),
    Column("tasks", Text),
    Column("groups", Text),
    Column("at", UTCDateTime),
)

_SQLITE_DISPATCH = (
    _dispatches.insert()
    .values(
        session_id=bindparam("sid"),
        n=bindparam("n"),
        tasks=bindparam("tasks"),
        groups=bindparam("groups"),
        at=bindparam("at", type_=UTCDateTime()),
    )
    .returning(select(S.queue).where(S.id == bindparam("sid")).scalar_subquery())
)
_PG_DISPATCH = text(
    """
    WITH s AS (
        UPDATE sf_sessions SET turns = turns + :n
        WHERE id = :sid AND status = 'open' AND (max_turns IS NULL OR turns + :n <= max_turns)
        RETURNING id, queue
    ), t AS (
        INSERT INTO sf_session_tasks (task_id, session_id, name, state, dispatched_at)
        SELECT x.task_id, s.id, x.name, 'pending', :at
        FROM s, json_to_recordset(CAST(:tasks AS json)) AS x(task_id text, name text)
        ON CONFLICT (task_id) DO NOTHING
    ), g AS (
        INSERT INTO sf_branch_groups
            (id, session_id, size, finished, snapshot_taken, snapshot, status, created_at)
        SELECT x.id, s.id, x.size, 0, x.now,
               CASE WHEN x.now THEN (
                   SELECT coalesce(json_object_agg(st.key, st.value), '{}'::json)
                   FROM sf_state st
                   WHERE st.scope = 'session' AND st.scope_id = s.id AND NOT st.deleted
               ) ELSE '{}'::json END,
               'open', :at
        FROM s, json_to_recordset(CAST(:groups AS json)) AS x(id text, size int, now boolean)
    )
    SELECT queue FROM s
    """
)


def task_status(state: str, last_run: str | None, running: bool) -> TaskStatus:
    """A registered task's status from its settlement and its latest run."""
    if state in (TaskStatus.CANCELLED.value, TaskStatus.LOST.value):
        return TaskStatus(state)
    if last_run is None:
        return TaskStatus.PENDING
    if running:
        return TaskStatus.STARTED
    if last_run in RUN_FINAL_STATES:
        return RUN_FINAL_STATES[last_run]
    if last_run == RUN_LOST:
        return TaskStatus.LOST
    return TaskStatus.PENDING  # RETRY: it runs again


class TasksSQL:
    """Registrations, runs and history: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines
    dialect: str

    # -- dispatch ------------------------------------------------------------------

    def dispatch(self, dispatch: Dispatch) -> str | None:
        tasks = [[task_id, name] for task_id, name in dispatch.tasks]
        groups = [[g.id, g.size, g.snapshot_now] for g in dispatch.groups]
        with self.engines.single() as conn:
            if conn.dialect.name == "postgresql":
                params = {
                    "sid": dispatch.session_id,
                    "n": len(tasks),
                    "at": dispatch.at,
                    "tasks": json.dumps([{"task_id": t, "name": n} for t, n in tasks]),
                    "groups": json.dumps(
                        [{"id": g, "size": s, "now": now} for g, s, now in groups]
                    ),
                }
                queue: str | None = conn.execute(_PG_DISPATCH, params).scalar()
                return queue
            params = {
                "sid": dispatch.session_id,
                "n": len(tasks),
                "tasks": json.dumps(tasks),
                "groups": json.dumps(groups),
                "at": dispatch.at,
            }
            queue = conn.execute(_SQLITE_DISPATCH, params).scalar()
            return queue

    def undo_dispatch(self, dispatch: Dispatch) -> None:
        task_ids = [task_id for task_id, _ in dispatch.tasks]
        with self.engines.write() as conn:
            conn.execute(
                update(sessions)
                .where(S.id == dispatch.session_id)
                .values(turns=S.turns - len(task_ids))
            )
            conn.execute(
                delete(session_tasks).where(
                    T.task_id.in_(task_ids), T.session_id == dispatch.session_id
                )
            )
            if dispatch.groups:
                conn.execute(
                    delete(branch_groups).where(
                        branch_groups.c.id.in_([g.id for g in dispatch.groups])
                    )
                )

    # -- runs ------------------------------------------------------------------------

    def record_runs(self, batch: Sequence[Run]) -> None:
        if not batch:
            return
        runs_ = _merged(batch)
        with self.engines.single() as conn:
            sqlite = conn.dialect.name == "sqlite"
            stamp = _sqlite_time if sqlite else _as_is
            params: list[Any] = []
            for run in runs_:
                params += (
                    run.session_id,
                    run.task_id,
                    run.attempt,
                    run.name,
                    run.state,
                    run.worker,
                    stamp(run.started_at),
                    stamp(run.finished_at),
                    run.error,
                )
            # Hand-written: compiling a many-row Core statement per flush cost more CPU
            # than executing it. Still one statement, seen by SQLAlchemy's events.
            conn.exec_driver_sql(_runs_sql("?" if sqlite else "%s", len(runs_)), tuple(params))

    def tasks(self, session_id: str) -> list[TaskRecord]:
        latest = (
            select(
                R.task_id,
                R.state,
                R.worker,
                R.started_at,
                R.finished_at,
                func.row_number()
                .over(partition_by=R.task_id, order_by=(R.attempt.desc(), R.id.desc()))
                .label("n"),
                R.name,
            )
            .where(R.session_id == session_id)
            .subquery()
        )
        query = (
            select(
                T.task_id,
                T.name,
                T.state,
                T.dispatched_at,
                T.finished_at.label("settled_at"),
                latest.c.state.label("run_state"),
                latest.c.worker,
                latest.c.started_at,
                latest.c.finished_at,
            )
            .select_from(
                session_tasks.outerjoin(
                    latest, and_(latest.c.task_id == T.task_id, latest.c.n == 1)
                )
            )
            .where(T.session_id == session_id)
            .order_by(T.dispatched_at, T.task_id)
        )
        # Tasks whose registration has not reached the store yet: known from their runs.
        unregistered = (
            select(
                latest.c.task_id,
                latest.c.name,
                literal(TaskStatus.PENDING.value).label("state"),
                latest.c.started_at.label("dispatched_at"),
                literal(None).label("settled_at"),
                latest.c.state.label("run_state"),
                latest.c.worker,
                latest.c.started_at,
                latest.c.finished_at,
            )
            .where(latest.c.n == 1)
            .where(not_(exists().where(T.task_id == latest.c.task_id)))
        )
        with self.engines.read() as conn:
            rows = list(conn.execute(query).all()) + list(conn.execute(unregistered).all())
        out = []
        for row in rows:
            running = row.run_state is not None and row.finished_at is None
            status = task_status(row.state, row.run_state, running)
            out.append(
                TaskRecord(
                    task_id=row.task_id,
                    name=row.name,
                    status=status,
                    worker=row.worker,
                    dispatched_at=row.dispatched_at,
                    started_at=row.started_at,
                    finished_at=row.finished_at or row.settled_at,
                )
            )
        return out

    # -- settlement ----------------------------------------------------------------

    def settle(
        self, session_id: str, *, running: Collection[str] = (), lose_started: bool = False
    ) -> Ended | None:
        now = utcnow()
        with self.engines.write() as conn:
            row = conn.execute(
                update(sessions)
                .where(S.id == session_id, S.status.in_(_ENDED), S.settled_at.is_(None))
                .values(settled_at=now)
                .returning(S.status, S.reason)
            ).first()
            if row is None:
                return None
            started = _in_progress(running)
            cancelled = _settle(conn, session_id, not_(started), TaskStatus.CANCELLED, now)
            lost: list[str] = []
            if lose_started:
                lost = _settle(conn, session_id, started, TaskStatus.LOST, now)
                _close_runs(conn, lost, now)
        return Ended(
            session_id, SessionStatus(row.status), row.reason or "", tuple(cancelled), tuple(lost)
        )

    def begin_move(self, session_id: str, hostname: str) -> Ended | None:
        now = utcnow()
        with self.engines.write() as conn:
            result = conn.execute(
                update(sessions)
                .where(
                    S.id == session_id, S.status == SessionStatus.OPEN.value, S.hostname == hostname
                )
                .values(
                    status=SessionStatus.PENDING.value,
                    reason=Reason.MOVING.value,
                    hostname=None,
                    queue=None,
                    last_activity_at=now,
                )
            )
            if result.rowcount != 1:
                return None
            lost = _settle(conn, session_id, _in_progress(()), TaskStatus.LOST, now)
            _close_runs(conn, lost, now)
        return Ended(session_id, SessionStatus.FAILED, "worker_lost", (), tuple(lost))

    def lose_interrupted(self, nodename: str) -> list[Ended]:
        now = utcnow()
        with self.engines.write() as conn:
            rows = conn.execute(
                update(runs)
                .where(R.worker == nodename, R.finished_at.is_(None))
                .values(state=RUN_LOST, finished_at=now, error="the worker process died")
                .returning(R.task_id, R.session_id)
            ).all()
            ids = [row.task_id for row in rows]
            lost = (
                conn.execute(
                    update(session_tasks)
                    .where(T.task_id.in_(ids), T.state == TaskStatus.PENDING.value, _unfinished())
                    .values(state=TaskStatus.LOST.value, finished_at=now)
                    .returning(T.task_id, T.session_id)
                ).all()
                if ids
                else []
            )
        by_session: dict[str, list[str]] = {}
        for row in lost:
            by_session.setdefault(row.session_id, []).append(row.task_id)
        return [
            Ended(sid, SessionStatus.OPEN, "worker_restarted", (), tuple(ids))
            for sid, ids in by_session.items()
        ]

    def lose_missing(
        self, session_id: str, present: Collection[str], before: datetime
    ) -> Ended | None:
        condition = [
            T.session_id == session_id,
            T.state == TaskStatus.PENDING.value,
            T.dispatched_at <= before,
            _unfinished(),
            not_(_in_progress(())),
        ]
        if present:
            condition.append(T.task_id.not_in(sorted(present)))
        now = utcnow()
        with self.engines.write() as conn:
            lost = list(
                conn.execute(
                    update(session_tasks)
                    .where(*condition)
                    .values(state=TaskStatus.LOST.value, finished_at=now)
                    .returning(T.task_id)
                ).scalars()
            )
        if not lost:
            return None
        return Ended(session_id, SessionStatus.OPEN, "worker_lost", (), tuple(lost))

    # -- history -----------------------------------------------------------------------

    def history(self, session_id: str, limit: int | None, bound: int) -> list[RunRecord]:
        keep = bound if limit is None else min(limit, bound)
        query = (
            select(runs)
            .where(R.session_id == session_id, R.finished_at.is_not(None))
            .order_by(R.started_at.desc(), R.id.desc())
            .limit(keep)
        )
        with self.engines.read() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            RunRecord(
                task_id=r["task_id"],
                name=r["name"],
                state=r["state"],
                worker=r["worker"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
                error=r["error"],
            )
            for r in reversed(rows)
        ]

    def compact(self, session_id: str, keep_last: int, bound: int | None = None) -> int:
        with self.engines.write() as conn:
            if bound is not None:
                _trim(conn, session_id, bound)
            return _trim(conn, session_id, keep_last)

    def trim_history(self, bound: int, *, batch: int) -> int:
        over = (
            select(R.session_id)
            .where(R.finished_at.is_not(None))
            .group_by(R.session_id)
            .having(func.count() > bound)
            .limit(batch)
        )
        dropped = 0
        with self.engines.write() as conn:
            for session_id in conn.execute(over).scalars().all():
                dropped += _trim(conn, session_id, bound)
        return dropped


_RUN_COLUMNS = "session_id, task_id, attempt, name, state, worker, started_at, finished_at, error"
_RUN_CONFLICT = (
    " ON CONFLICT (session_id, task_id, attempt) DO UPDATE SET"
    # A run's end never goes back to "running": a late start record keeps the end.
    " state = CASE WHEN sf_runs.finished_at IS NOT NULL THEN sf_runs.state"
    " ELSE excluded.state END,"
    " finished_at = COALESCE(sf_runs.finished_at, excluded.finished_at),"
    " error = CASE WHEN sf_runs.finished_at IS NOT NULL THEN sf_runs.error"
    " ELSE excluded.error END,"
    " worker = COALESCE(excluded.worker, sf_runs.worker),"
    " name = COALESCE(excluded.name, sf_runs.name)"
)
_RUNS_SQL: dict[tuple[str, int], str] = {}


def _runs_sql(mark: str, rows: int) -> str:
    """The upsert of ``rows`` runs, with the driver's parameter ``mark``."""
    sql = _RUNS_SQL.get((mark, rows))
    if sql is None:
        one = "(" + ", ".join([mark] * 9) + ")"
        sql = f"INSERT INTO sf_runs ({_RUN_COLUMNS}) VALUES " + ", ".join([one] * rows)
        sql = _RUNS_SQL[(mark, rows)] = sql + _RUN_CONFLICT
    return sql


def _sqlite_time(value: datetime | None) -> str | None:
    """A timestamp as SQLAlchemy stores it in SQLite: naive UTC, microseconds always."""
    if value is None:
        return None
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _as_is(value: datetime | None) -> datetime | None:
    return value


def _merged(batch: Sequence[Run]) -> list[Run]:
    """One row per (task, attempt): the end wins over the start of the same run."""
    merged: dict[tuple[str, str, int], Run] = {}
    for run in batch:
        key = (run.session_id, run.task_id, run.attempt)
        earlier = merged.get(key)
        if earlier is None or earlier.finished_at is None:
            merged[key] = run
    return list(merged.values())


def _in_progress(running: Collection[str]) -> Any:
    """SQL: the task is running (the worker says so, or a run has no end yet)."""
    started = exists().where(R.task_id == T.task_id, R.finished_at.is_(None))
    if running:
        return or_(T.task_id.in_(sorted(running)), started)
    return started


def _unfinished() -> Any:
    """SQL: no run of the task ended in a final state."""
    return not_(exists().where(R.task_id == T.task_id, R.state.in_(_FINAL)))


def _settle(
    conn: Connection, session_id: str, which: Any, status: TaskStatus, now: datetime
) -> list[str]:
    return list(
        conn.execute(
            update(session_tasks)
            .where(
                T.session_id == session_id,
                T.state == TaskStatus.PENDING.value,
                _unfinished(),
                which,
            )
            .values(state=status.value, finished_at=now)
            .returning(T.task_id)
        ).scalars()
    )


def _close_runs(conn: Connection, task_ids: list[str], now: datetime) -> None:
    if task_ids:
        conn.execute(
            update(runs)
            .where(R.task_id.in_(task_ids), R.finished_at.is_(None))
            .values(state=RUN_LOST, finished_at=now, error="the worker process died")
        )


def _trim(conn: Connection, session_id: str, keep: int) -> int:
    older = (
        select(R.id)
        .where(R.session_id == session_id, R.finished_at.is_not(None))
        .order_by(R.started_at.desc(), R.id.desc())
        .offset(keep)
    )
    if conn.dialect.name == "sqlite":
        older = older.limit(-1)
    result = conn.execute(delete(runs).where(R.id.in_(older.scalar_subquery())))
    return int(result.rowcount)


__all__ = ["RUN_STARTED", "TasksSQL", "task_status"]

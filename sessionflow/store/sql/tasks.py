"""Task registrations and their status in SQL (runs: ``runs.py``; ends: ``settlement.py``).

Registering a dispatch is one statement on both databases: PostgreSQL takes the
turns, inserts the task rows and the branch groups in one data-modifying WITH;
SQLite inserts one row into ``sf_dispatches`` whose triggers do the same (see
migration 0004).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

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
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from ...enums import RUN_FINAL_STATES, RUN_LOST, RUN_STARTED, SessionStatus, TaskStatus
from ...records import Dispatch, TaskRecord
from .engine import Engines
from .models import ENDED, UTCDateTime, branch_groups, runs, session_tasks, sessions

T, R, S = session_tasks.c, runs.c, sessions.c

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


def register(
    conn: Connection,
    session_id: str,
    tasks: Sequence[tuple[str, str | None]],
    at: datetime,
) -> None:
    """Insert pending rows for tasks not registered yet (one statement)."""
    if not tasks:
        return
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    rows = [
        {
            "task_id": task_id,
            "session_id": session_id,
            "name": name,
            "state": TaskStatus.PENDING.value,
            "dispatched_at": at,
        }
        for task_id, name in tasks
    ]
    conn.execute(insert(session_tasks).values(rows).on_conflict_do_nothing())


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

    def late_dispatch(self, dispatch: Dispatch) -> tuple[str, ...]:
        ids = [task_id for task_id, _ in dispatch.tasks]
        with self.engines.write() as conn:
            query = select(S.status, S.settled_at).where(S.id == dispatch.session_id)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()  # settle() waits, or we see its end
            row = conn.execute(query).first()
            if row is not None and (
                row.status == SessionStatus.OPEN.value
                or (row.status in ENDED and row.settled_at is None)
            ):
                conn.execute(
                    update(sessions)
                    .where(S.id == dispatch.session_id)
                    .values(turns=S.turns + len(ids))
                )
                register(conn, dispatch.session_id, dispatch.tasks, dispatch.at)
                return ()
            known = set(conn.execute(select(T.task_id).where(T.task_id.in_(ids))).scalars())
        return tuple(task_id for task_id in ids if task_id not in known)

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

    # -- reading -------------------------------------------------------------------

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
                func.coalesce(T.name, latest.c.name).label("name"),
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


__all__ = ["RUN_STARTED", "TasksSQL", "register", "task_status"]

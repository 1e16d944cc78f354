"""Ends of session tasks in SQL: when a session ends, moves or loses its worker, which
of its registered tasks are cancelled and which are lost.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import exists, not_, or_, select, update
from sqlalchemy.engine import Connection

from ...enums import RUN_FINAL_STATES, RUN_LOST, Reason, SessionStatus, TaskStatus
from ...records import Ended, utcnow
from .engine import Engines
from .models import ENDED, runs, session_tasks, sessions
from .tasks import register

T, R, S = session_tasks.c, runs.c, sessions.c
_FINAL = tuple(RUN_FINAL_STATES)


class SettlementSQL:
    """Settlement and lost tasks: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

    def settle(
        self, session_id: str, *, running: Collection[str] = (), lose_started: bool = False
    ) -> Ended | None:
        now = utcnow()
        with self.engines.write() as conn:
            row = conn.execute(
                update(sessions)
                .where(S.id == session_id, S.status.in_(ENDED), S.settled_at.is_(None))
                .values(settled_at=now)
                .returning(S.status, S.reason)
            ).first()
            if row is None:
                return None
            # Running tasks whose registration is still on its way are registered now:
            # late_dispatch then knows they have a result coming.
            register(conn, session_id, [(task_id, None) for task_id in sorted(running)], now)
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

    def lose_interrupted(
        self, nodename: str, *, silent_for: float | None = None, reason: str = "worker_restarted"
    ) -> list[Ended]:
        now = utcnow()
        which = [R.worker == nodename, R.finished_at.is_(None)]
        if silent_for is not None:
            which.append(
                R.session_id.in_(
                    select(S.id).where(S.heartbeat_timeout < silent_for).scalar_subquery()
                )
            )
        with self.engines.write() as conn:
            rows = conn.execute(
                update(runs)
                .where(*which)
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
            Ended(sid, SessionStatus.OPEN, reason, (), tuple(ids))
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


__all__ = ["SettlementSQL"]

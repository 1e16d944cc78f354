"""Task-run history of sessions, and the middleware that feeds history and state.

Every execution of a session task in a pool process (retries and failures
included) becomes one row of ``sf_runs`` when it ends. ``Session.history()``
reads them oldest to newest (by start time); ``Session.compact(keep_last=N)``
keeps the newest N, and ``sessionflow_history_max_runs`` bounds every session's
history the same way on each write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import signals
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from . import branches
from .celery_ext.tracing import Middleware
from .errors import InvalidArgument
from .models import runs
from .runtime import TaskRun, current_run
from .store import utcnow

if TYPE_CHECKING:
    from .flow import SessionFlow

logger = logging.getLogger("sessionflow.state")
_STARTED, _ERROR = "sessionflow.started_at", "sessionflow.error"
_MAX_ERROR = 2000


@dataclass(frozen=True)
class RunRecord:
    """One execution of a session task, as ``Session.history()`` reports it."""

    task_id: str
    name: str | None
    state: str  # Celery state: SUCCESS, FAILURE, RETRY, ...
    worker: str | None
    started_at: datetime
    finished_at: datetime
    error: str | None


def history(flow: SessionFlow, session_id: str, limit: int | None = None) -> list[RunRecord]:
    """The session's runs, oldest first; with ``limit`` only the newest ``limit`` of them."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgument(f"limit must be a positive whole number or None, got {limit!r}")
    c = runs.c
    query = select(runs).where(c.session_id == session_id)
    query = query.order_by(c.started_at.desc(), c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    with flow.store._read() as conn:
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


def compact(flow: SessionFlow, session_id: str, keep_last: int) -> int:
    """Drop all but the newest ``keep_last`` runs; returns how many were dropped."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise InvalidArgument(f"keep_last must be a whole number >= 0, got {keep_last!r}")
    with flow.store._write() as conn:
        return _trim(conn, session_id, keep_last)


def _trim(conn: Connection, session_id: str, keep: int) -> int:
    c = runs.c
    older = (
        select(c.id)
        .where(c.session_id == session_id)
        .order_by(c.started_at.desc(), c.id.desc())
        .offset(keep)
    )
    if conn.dialect.name == "sqlite":
        older = older.limit(-1)
    result = conn.execute(delete(runs).where(c.id.in_(older.scalar_subquery())))
    return int(result.rowcount)


def record_run(flow: SessionFlow, run: TaskRun, state: str) -> None:
    """Write one finished execution and keep the session's history within its bound."""
    now = utcnow()
    error = run.extra.get(_ERROR)
    with flow.store._write() as conn:
        conn.execute(
            insert(runs).values(
                session_id=run.session_id,
                task_id=run.task_id,
                name=run.task_name,
                state=state,
                worker=run.worker or None,
                started_at=run.extra.get(_STARTED) or now,
                finished_at=now,
                error=error[:_MAX_ERROR] if error else None,
            )
        )
        _trim(conn, run.session_id, flow.config.history_max_runs)


class StateMiddleware(Middleware):
    """Gives branch tasks their private state, merges branches, records each run."""

    def __init__(self, flow: SessionFlow) -> None:
        self.flow = flow

    def before_body(self, run: TaskRun) -> None:
        run.extra[_STARTED] = utcnow()
        branches.start_member(self.flow, run)

    def after_body(self, run: TaskRun, retval: Any) -> None:
        branches.finish_member(self.flow, run)

    def after_task(self, run: TaskRun, state: str) -> None:
        try:
            branches.fail_member(self.flow, run, state)
        finally:
            record_run(self.flow, run, state)


def _note_error(task_id: str | None, exc: BaseException | None) -> None:
    run = current_run()
    if run is not None and exc is not None and (task_id is None or run.task_id == task_id):
        run.extra[_ERROR] = f"{type(exc).__name__}: {exc}"


def _on_failure(
    task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    _note_error(task_id, exception)


def _on_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    exc = reason if isinstance(reason, BaseException) else None
    _note_error(getattr(request, "id", None), exc)


_connected = False


def install(flow: SessionFlow) -> None:
    """Add the state/history middleware to ``flow`` (idempotent)."""
    global _connected
    if not any(isinstance(m, StateMiddleware) for m in flow.middleware):
        flow.middleware.append(StateMiddleware(flow))
    if not _connected:
        signals.task_failure.connect(_on_failure, weak=False)
        signals.task_retry.connect(_on_retry, weak=False)
        _connected = True

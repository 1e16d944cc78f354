"""Runs and history in SQL: each attempt of a session task, as workers report it.

A batch of runs is one hand-written upsert; a run's end is never overwritten by a
late report of its start.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection

from ...records import Run, RunRecord, check_utc, runs_to_write
from .engine import Engines
from .models import runs

R = runs.c


class RunsSQL:
    """Runs and history: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

    # -- runs ------------------------------------------------------------------------

    def record_runs(self, batch: Sequence[Run]) -> None:
        if not batch:
            return
        runs_ = runs_to_write(batch)
        with self.engines.single() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(_PG_RUNS, (_pg_rows(runs_),))
                return
            params: list[Any] = []
            for run in runs_:
                params += (
                    run.session_id,
                    run.task_id,
                    run.attempt,
                    run.name,
                    run.state,
                    run.worker,
                    _sqlite_time(run.started_at),
                    _sqlite_time(run.finished_at),
                    run.error,
                )
            # Hand-written: compiling a many-row Core statement per flush cost more CPU
            # than executing it. Still one statement, seen by SQLAlchemy's events.
            conn.exec_driver_sql(_sqlite_runs_sql(len(runs_)), tuple(params))

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
# PostgreSQL: the whole batch is one JSON parameter. A VALUES list with nine
# parameters per row made psycopg re-parse the (uncacheable, over 4 KiB) query at every
# flush, ~50 us of CPU per row; this text is short, constant and prepared by the server.
_PG_RUNS = (
    f"INSERT INTO sf_runs ({_RUN_COLUMNS})"
    " SELECT x.s, x.t, x.a, x.n, x.st, x.w, x.sa, x.fa, x.e"
    " FROM json_to_recordset(CAST(%s AS json)) AS x(s text, t text, a int, n text, st text,"
    " w text, sa timestamptz, fa timestamptz, e text)" + _RUN_CONFLICT
)


def _pg_rows(runs_: Sequence[Run]) -> str:
    return json.dumps(
        [
            {
                "s": run.session_id,
                "t": run.task_id,
                "a": run.attempt,
                "n": run.name,
                "st": run.state,
                "w": run.worker,
                "sa": _iso(run.started_at),
                "fa": _iso(run.finished_at),
                "e": run.error,
            }
            for run in runs_
        ]
    )


@functools.cache
def _sqlite_runs_sql(rows: int) -> str:
    """The SQLite upsert of ``rows`` runs (the driver caches it by its text)."""
    one = "(" + ", ".join(["?"] * 9) + ")"
    return f"INSERT INTO sf_runs ({_RUN_COLUMNS}) VALUES " + ", ".join([one] * rows) + _RUN_CONFLICT


def _sqlite_time(value: datetime | None) -> str | None:
    """A timestamp as SQLAlchemy stores it in SQLite: naive UTC, microseconds always."""
    if value is None:
        return None
    return _utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _utc(value).isoformat()


def _utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive one is refused, as the column type refuses it elsewhere."""
    check_utc(value)
    return value.astimezone(timezone.utc)


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


__all__ = ["RunsSQL"]

"""Retention in SQL: ended sessions go, with everything that belongs to them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Table, delete, func, select

from ...records import PruneCounts
from .engine import Engines
from .models import (
    ENDED,
    branch_groups,
    branch_members,
    runs,
    session_tasks,
    sessions,
    state_entries,
)

S = sessions.c


class RetentionSQL:
    """Pruning of ended sessions: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

    def prune(self, ended_before: datetime, *, batch: int, dry_run: bool = False) -> PruneCounts:
        due = select(S.id).where(
            S.status.in_(ENDED), S.settled_at.is_not(None), S.closed_at < ended_before
        )
        if not dry_run:
            due = due.order_by(S.closed_at).limit(batch)
        with self.engines.write() as conn:
            ids = list(conn.execute(due).scalars())
            if not ids:
                return PruneCounts()

            def count(table: Table, condition: ColumnElement[bool]) -> int:
                query = select(func.count()).select_from(table).where(condition)
                return int(conn.execute(query).scalar_one())

            state_rows = (state_entries.c.scope == "session") & state_entries.c.scope_id.in_(ids)
            counts = PruneCounts(
                sessions=len(ids),
                tasks=count(session_tasks, session_tasks.c.session_id.in_(ids)),
                runs=count(runs, runs.c.session_id.in_(ids)),
                state_keys=count(state_entries, state_rows),
            )
            if not dry_run:
                conn.execute(delete(state_entries).where(state_rows))
                # Task rows, runs and branch groups go with their session (ON DELETE CASCADE).
                conn.execute(delete(sessions).where(S.id.in_(ids)))
        return counts

    def reclaim(self) -> None:
        """PostgreSQL: VACUUM the tables pruning and churn leave dead rows in, so their
        space is reused at once instead of when autovacuum next gets to them (without
        it the files grew ~1 MB per 1,000 sessions under retention 0). Never blocks
        readers or writers. SQLite reuses freed pages by itself: nothing to do."""
        if self.engines.config.is_sqlite:
            return
        with self.engines.single() as conn:
            conn.exec_driver_sql(f"VACUUM {', '.join(t.name for t in _CHURNED)}")


# Rows deleted by pruning or rewritten by every session: sessions (status updates),
# their tasks, runs, branches and session-scope state.
_CHURNED = (sessions, session_tasks, runs, branch_groups, branch_members, state_entries)

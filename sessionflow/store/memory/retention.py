"""Retention in memory: ended sessions go, with everything that belongs to them."""

from __future__ import annotations

from datetime import datetime

from ...records import PruneCounts, check_utc
from ._data import ENDED, MemoryBase


class RetentionMemory(MemoryBase):
    """Pruning of ended sessions: a part of :class:`~sessionflow.store.memory.MemoryStore`."""

    def prune(self, ended_before: datetime, *, batch: int, dry_run: bool = False) -> PruneCounts:
        check_utc(ended_before)
        with self._lock:
            due = sorted(
                (
                    row
                    for row in self._sessions.values()
                    if row.status in ENDED
                    and row.settled_at is not None
                    and row.closed_at is not None
                    and row.closed_at < ended_before
                ),
                key=lambda row: (row.closed_at, row.id),
            )
            ids = {row.id for row in (due if dry_run else due[: max(batch, 0)])}
            if not ids:
                return PruneCounts()
            counts = PruneCounts(
                sessions=len(ids),
                tasks=sum(1 for t in self._tasks.values() if t.session_id in ids),
                runs=sum(1 for r in self._runs.values() if r.session_id in ids),
                state_keys=sum(len(self._state.get(("session", sid), {})) for sid in ids),
            )
            if not dry_run:
                for sid in ids:
                    del self._sessions[sid]
                    self._state.pop(("session", sid), None)
                self._tasks = {k: t for k, t in self._tasks.items() if t.session_id not in ids}
                self._runs = {k: r for k, r in self._runs.items() if r.session_id not in ids}
                self._groups = {k: g for k, g in self._groups.items() if g.session_id not in ids}
            return counts

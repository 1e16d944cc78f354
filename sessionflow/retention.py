"""Retention: ended sessions are deleted, with their tasks, runs, branches and session state.

``sessionflow_retention`` (default 7 days, ``None`` keeps everything) is how long an
ended session stays. The holder of the sweeper lease (a worker's ticker or a client's
watcher thread) prunes every 30 seconds, in batches, so one pass never holds the store
for long, and trims histories to ``sessionflow_history_max_runs`` (also when retention
is None); a pass that deleted rows then lets the database reuse their space
(PostgreSQL: VACUUM, see ``SQLStore.reclaim``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from .records import PruneCounts, utcnow
from .store import SessionStore

BATCH = 500


def prune(
    store: SessionStore,
    retention: float | None,
    history_bound: int,
    *,
    batch: int = BATCH,
    stop: Callable[[], bool] = lambda: False,
) -> PruneCounts:
    """Delete sessions ended more than ``retention`` seconds ago (None: none), ``batch``
    at a time, then trim every session's history to its bound. Returns what went."""
    total = PruneCounts()
    cutoff = None if retention is None else utcnow() - timedelta(seconds=retention)
    while cutoff is not None and not stop():
        done = store.prune(cutoff, batch=batch)
        total = total + done
        if done.sessions < batch:
            break
    trimmed = store.trim_history(history_bound, batch=batch)
    if total.sessions or trimmed:
        store.reclaim()
    return total

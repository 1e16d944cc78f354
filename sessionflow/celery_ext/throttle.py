"""Per-worker limits on session tasks of one name (``--session-task-limits "proj.render=1"``).

A worker may hold many sessions whose tasks compete for one local thing (a GPU
encoder, a licence): at most N tasks of a limited name run at once on it, across
all its sessions. The gate hands every other request of that name to this
limiter instead of the pool; the limiter keeps it, in arrival order, and hands it
to the pool when a running one ends. Nothing fails and nothing is reordered
within a name.

Held requests stay unacknowledged, as Celery's ETA tasks do, and like them they
do not use up the prefetch window: the limiter raises the consumer's prefetch
count by one per held request and lowers it when the request runs, so plain
tasks and other sessions' tasks keep flowing. A worker that dies with held
requests loses nothing: the broker (or the sweeper) puts them back in the queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sessionflow.worker")
Submit = Callable[[Any], Any]


class TaskLimiter:
    """Counts the running session tasks of each limited name; holds the ones over."""

    def __init__(self) -> None:
        self.limits: dict[str, int] = {}
        self._qos: Callable[[], Any] = lambda: None
        self._lock = threading.RLock()
        self._running: dict[str, int] = {}
        self._inflight: dict[str, str] = {}  # task id -> name, from hand-over to its end
        self._in_pool: set[str] = set()
        self._held: dict[str, deque[tuple[Any, Submit]]] = {}

    def configure(self, limits: dict[str, int], qos: Callable[[], Any]) -> None:
        """``qos()``: the consumer's QoS (prefetch), once the consumer runs."""
        self.limits = dict(limits)
        self._qos = qos

    def submit(self, req: Any, process_task: Submit) -> Any:
        """Hand ``req`` to the pool now, or hold it until a task of its name ends."""
        name = req.name
        limit = self.limits.get(name)
        if limit is None:
            return process_task(req)
        with self._lock:
            held = self._running.get(name, 0) >= limit
            if held:
                self._held.setdefault(name, deque()).append((req, process_task))
            else:
                self._take(req.id, name)
        if held:
            self._prefetch(1)
            logger.debug("sessionflow: holding %s[%s] (limit %d)", name, req.id, limit)
            return None
        return self._hand_over(req, process_task)

    def follow(self, task_id: str, options: dict[str, Any]) -> None:
        """The pool took ``task_id``: count it as running until its callbacks fire."""
        with self._lock:
            if task_id not in self._inflight:
                return
            self._in_pool.add(task_id)
        for name in ("callback", "error_callback"):
            theirs = options.get(name)
            options[name] = _then(theirs, lambda *_a, **_k: self.finished(task_id))

    def finished(self, task_id: str) -> None:
        """A limited task ended (or never reached the pool): let the next one of its name run."""
        with self._lock:
            name = self._inflight.pop(task_id, None)
            self._in_pool.discard(task_id)
            if name is None:
                return
            self._running[name] -= 1
            waiting = self._held.get(name)
            following = None
            if waiting and self._running[name] < self.limits.get(name, 0):
                following = waiting.popleft()
                self._take(following[0].id, name)
        if following is not None:
            self._prefetch(-1)
            self._hand_over(*following)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                name: {
                    "limit": limit,
                    "running": self._running.get(name, 0),
                    "waiting": len(self._held.get(name, ())),
                }
                for name, limit in self.limits.items()
            }

    def _take(self, task_id: str, name: str) -> None:
        self._running[name] = self._running.get(name, 0) + 1
        self._inflight[task_id] = name

    def _hand_over(self, req: Any, process_task: Submit) -> Any:
        try:
            return process_task(req)
        finally:
            with self._lock:
                taken = req.id in self._in_pool or req.id not in self._inflight
            if not taken:  # revoked, expired: it never reached the pool
                self.finished(req.id)

    def _prefetch(self, change: int) -> None:
        qos = self._qos()
        if qos is None:
            return
        try:
            if change > 0:
                qos.increment_eventually(change)
            else:
                qos.decrement_eventually(-change)
        except Exception:
            logger.exception("sessionflow: could not change the prefetch count")


def _then(theirs: Callable[..., Any] | None, ours: Callable[..., None]) -> Callable[..., Any]:
    """Celery's callback first, then ours (which never breaks theirs)."""

    def both(*args: Any, **kwargs: Any) -> Any:
        try:
            return theirs(*args, **kwargs) if theirs is not None else None
        finally:
            try:
                ours()
            except Exception:
                logger.exception("sessionflow: task limit release failed")

    return both


__all__ = ["TaskLimiter"]

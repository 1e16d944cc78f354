"""Terminal results for the tasks an ended session leaves behind, so no caller waits forever.

A result is stored only where the task has none that is final yet: a task that
finished just before its session ended (its end not yet in the store) keeps its
own SUCCESS or FAILURE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import states
from celery.backends.base import DisabledBackend
from celery.backends.rpc import RPCBackend

from .errors import ConfigurationError, SessionTaskLost, ended_error
from .records import Ended

logger = logging.getLogger("sessionflow")


def check_backend(app: Any) -> None:
    """Refuse a result backend that cannot store a result for any task id."""
    if isinstance(app.backend, RPCBackend):
        raise ConfigurationError(
            "sessionflow cannot use Celery's rpc:// result backend: it answers only the "
            "caller of a task a worker runs, so the callers of tasks lost with a dead "
            "worker (or closed before they ran) would wait for ever. Use a backend that "
            "stores results by task id (redis://, db+postgresql://..., a cache, file://), "
            "or result_backend = None if no caller reads results"
        )


class Resolver:
    """Stores SessionClosed / SessionFailed / SessionTaskLost for unfinished tasks."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.failures = 0  # results that could not be stored (logged each time)

    def resolve(self, ended: Ended) -> None:
        """Results for the tasks ``ended`` cancelled (never ran) and lost (were running)."""
        if ended.cancelled:
            error = ended_error(ended.session_id, ended.status.value, ended.reason)
            self.store_failures(ended.cancelled, error)
        if ended.lost:
            lost = SessionTaskLost(
                f"task was running on the worker of session {ended.session_id} when that "
                f"worker process died ({ended.reason}); it did not finish — run it again if it "
                "is safe",
                ended.session_id,
                ended.reason,
            )
            self.store_failures(ended.lost, lost)

    def store_failures(self, task_ids: Iterable[str], error: Exception) -> None:
        backend = self.app.backend
        if isinstance(backend, DisabledBackend):
            return
        for task_id in task_ids:
            try:
                if backend.get_state(task_id) in states.READY_STATES:
                    continue  # it finished after all: keep its own result
                backend.store_result(task_id, error, states.FAILURE)
            except Exception:
                self.failures += 1
                logger.exception("could not store %s for task %s", type(error).__name__, task_id)

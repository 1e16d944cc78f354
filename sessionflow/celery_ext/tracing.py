"""Gate every session task at the moment it starts, inside the pool process.

Celery runs a task through ``task.__trace__``; wrapping it is the one place
that sees each execution right before it begins, in prefork children as well
as in solo and thread pools. A task whose session is no longer open does not
run: it fails with SessionClosed/SessionFailed instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery import states
from celery.app.task import Context
from celery.app.trace import TraceInfo, trace_ok_t

from ..canvas import SESSION_HEADER
from ..session import ended_error
from ..store import TASK_FAILED, TASK_PENDING, TASK_SUCCEEDED

if TYPE_CHECKING:
    from ..flow import SessionFlow

logger = logging.getLogger("sessionflow.worker")

_FINISHED = {
    states.SUCCESS: TASK_SUCCEEDED,
    states.RETRY: TASK_PENDING,  # it runs again with the same id
    states.IGNORED: TASK_SUCCEEDED,
    states.REJECTED: TASK_FAILED,
}


class SessionTracer:
    """Wraps a task's tracer: checks its session at start, records its end."""

    def __init__(self, flow: SessionFlow, task: Any, inner: Any) -> None:
        self.flow = flow
        self.task = task
        self.inner = inner

    def __call__(self, uuid: str, args: Any, kwargs: Any, request: Any = None) -> Any:
        session_id = (request or {}).get(SESSION_HEADER)
        if not session_id:
            return self.inner(uuid, args, kwargs, request)
        store = self.flow.store
        worker = request.get("hostname") or ""
        if not store.task_started(session_id, uuid, self.task.name, worker):
            return self._refuse(session_id, uuid, args, kwargs, request)
        result = self.inner(uuid, args, kwargs, request)
        info = result[1]
        state = _FINISHED.get(info.state, TASK_FAILED) if info is not None else TASK_SUCCEEDED
        try:
            store.task_finished(uuid, state)
        except Exception:  # the result is stored already; do not turn success into failure
            logger.exception("could not record the end of session task %s", uuid)
        return result

    def _refuse(self, session_id: str, uuid: str, args: Any, kwargs: Any, request: Any) -> Any:
        row = self.flow.store.get_session(session_id)
        error = ended_error(session_id, row and row["status"], row and row["reason"])
        context = Context(request, args=args, kwargs=kwargs, called_directly=False)
        self.task.backend.store_result(uuid, error, states.FAILURE, request=context)
        logger.info("not running %s[%s]: %s", self.task.name, uuid, error)
        try:
            raise error
        except type(error):
            einfo = ExceptionInfo()
        return trace_ok_t(einfo, TraceInfo(states.FAILURE, error), 0.0, None)


def wrap_tracers(flow: SessionFlow) -> None:
    """Wrap the tracer of every task of the app (idempotent)."""
    for task in flow.app.tasks.values():
        inner = getattr(task, "__trace__", None)
        if inner is None or isinstance(inner, SessionTracer):
            continue
        task.__trace__ = SessionTracer(flow, task, inner)

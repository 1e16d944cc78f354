"""Gate every session task at the moment it starts, inside the pool process.

Celery runs a task through ``task.__trace__``; wrapping it is the one place
that sees each execution right before it begins, in prefork children as well
as in solo and thread pools. A task whose session is no longer open does not
run: it fails with SessionClosed/SessionFailed instead.

The task body (``task.run``) is wrapped too, so middleware can act after the
body returned but before Celery stores the result (and so before a chord body
or a waiting caller can see it).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from billiard.einfo import ExceptionInfo
from celery import states
from celery.app.task import Context
from celery.app.trace import TraceInfo, build_tracer, trace_ok_t

from ..canvas import SESSION_HEADER
from ..errors import StoreError
from ..runtime import TaskRun, current_run, set_current_run
from ..session import ended_error
from ..store import TASK_FAILED, TASK_PENDING, TASK_SUCCEEDED

if TYPE_CHECKING:
    from ..flow import SessionFlow

logger = logging.getLogger("sessionflow.worker")
T = TypeVar("T")
STORE_PATIENCE = 30.0  # seconds a pool process waits for the store before failing a task

_FINISHED = {
    states.SUCCESS: TASK_SUCCEEDED,
    states.RETRY: TASK_PENDING,  # it runs again with the same id
    states.IGNORED: TASK_SUCCEEDED,
    states.REJECTED: TASK_FAILED,
}


class Middleware:
    """Hooks around session task executions; subclasses override what they need."""

    def before_body(self, run: TaskRun) -> None:
        """The session is open and the body is about to run."""

    def after_body(self, run: TaskRun, retval: Any) -> None:
        """The body returned ``retval``; its result is not stored yet."""

    def after_task(self, run: TaskRun, state: str) -> None:
        """The execution ended in Celery ``state`` and its result is stored."""


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
        worker = request.get("hostname") or ""
        try:
            queue = _retrying(
                lambda: self.flow.store.task_started(session_id, uuid, self.task.name, worker)
            )
        except StoreError as exc:
            return self._fail(uuid, args, kwargs, request, exc)
        if queue is None:
            row = self.flow.store.get_session(session_id)
            error = ended_error(
                session_id, row["status"] if row else None, row["reason"] if row else None
            )
            logger.info("not running %s[%s]: %s", self.task.name, uuid, error)
            return self._fail(uuid, args, kwargs, request, error)
        run = TaskRun(session_id, uuid, self.task.name, worker, request, queue)
        set_current_run(run)
        state = states.FAILURE
        try:
            for middleware in self.flow.middleware:
                middleware.before_body(run)
            result = self.inner(uuid, args, kwargs, request)
            info = result[1]
            state = info.state if info is not None else states.SUCCESS
            return result
        finally:
            set_current_run(None)
            self._finish(run, state)

    def _finish(self, run: TaskRun, state: str) -> None:
        try:
            _retrying(
                lambda: self.flow.store.task_finished(
                    run.task_id, _FINISHED.get(state, TASK_FAILED)
                )
            )
        except Exception:  # the result is stored already; do not turn success into failure
            logger.exception("could not record the end of session task %s", run.task_id)
        for middleware in self.flow.middleware:
            try:
                middleware.after_task(run, state)
            except Exception:
                logger.exception(
                    "sessionflow middleware %r failed after %s", middleware, run.task_id
                )

    def _fail(self, uuid: str, args: Any, kwargs: Any, request: Any, error: Exception) -> Any:
        """Fail the task without running it: store ``error`` as its result."""
        context = Context(request, args=args, kwargs=kwargs, called_directly=False)
        self.task.backend.store_result(uuid, error, states.FAILURE, request=context)
        try:
            raise error
        except type(error):
            einfo = ExceptionInfo()
        return trace_ok_t(einfo, TraceInfo(states.FAILURE, error), 0.0, None)


def _retrying(call: Callable[[], T], patience: float = STORE_PATIENCE) -> T:
    """Run a store call, retrying through a short database outage (a restart)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except StoreError as exc:
            if time.monotonic() >= deadline:
                raise
            logger.warning("sessionflow: store unavailable, retrying: %s", exc)
            time.sleep(0.5)


class SessionBody:
    """Wraps ``task.run``: middleware sees the return value before it is stored.

    ``__wrapped__`` and the copied attributes keep ``inspect.signature(task.run)``
    what it was: ``Task.retry`` reads it to merge args and kwargs.
    """

    def __init__(self, flow: SessionFlow, run: Any) -> None:
        self.flow = flow
        self.run = run
        functools.update_wrapper(self, run)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        retval = self.run(*args, **kwargs)
        run = current_run()
        if run is not None:
            for middleware in self.flow.middleware:
                middleware.after_body(run, retval)
        return retval


def wrap_tracers(flow: SessionFlow, hostname: str) -> None:
    """Wrap the body and tracer of every task of the app (idempotent).

    The tracer is rebuilt the way Celery builds it (``process_initializer``,
    ``Consumer.update_strategies``) so that it calls the wrapped body.
    """
    app = flow.app
    for name, task in app.tasks.items():
        if isinstance(getattr(task, "__trace__", None), SessionTracer):
            continue
        if not isinstance(task.__dict__.get("run"), SessionBody):
            task.run = SessionBody(flow, task.run)
        inner = build_tracer(name, task, app.loader, hostname, app=app)
        task.__trace__ = SessionTracer(flow, task, inner)


__all__ = ["Middleware", "SessionBody", "SessionTracer", "TaskRun", "current_run", "wrap_tracers"]

"""Gate every session task at the moment it starts, in the process that runs it.

Celery runs a task through ``task.__trace__``; wrapping it is the one place
that sees each execution right before it begins, in prefork children as well
as in solo and thread pools. The gate asks no store: it claims the start in the
worker's live directory (see :mod:`.live`), which fails once the session ended.
A task that may not start fails with SessionClosed/SessionFailed instead.

The task body (``task.run``) is wrapped too, so middleware can act after the
body returned but before Celery stores the result (and so before a chord body
or a waiting caller can see it). Tasks outside sessions pass straight through.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery import states
from celery.app.task import Context
from celery.app.trace import TraceInfo, build_tracer, trace_ok_t

from ..canvas import SESSION_HEADER
from ..errors import SessionFlowError, SessionTaskRefused, ended_error
from ..middleware import Middleware
from ..runtime import TaskRun, current_run, set_current_run
from .live import claim

if TYPE_CHECKING:
    from ..flow import SessionFlow

logger = logging.getLogger("sessionflow.worker")
#: Set on the error of a task the gate did not let start (the main process reads it).
REFUSED = "_sessionflow_refused"


class SessionTracer:
    """Wraps a task's tracer: claims its start in its session, runs the middleware."""

    def __init__(self, flow: SessionFlow, task: Any, inner: Any) -> None:
        self.flow = flow
        self.task = task
        self.inner = inner

    def __call__(self, uuid: str, args: Any, kwargs: Any, request: Any = None) -> Any:
        session_id = (request or {}).get(SESSION_HEADER)
        if not session_id:
            return self.inner(uuid, args, kwargs, request)
        live_dir = self.flow.live_dir
        if live_dir is None or not claim(live_dir, session_id, uuid):
            return self._refuse(uuid, args, kwargs, request, session_id)
        worker = request.get("hostname") or ""
        run = TaskRun(
            session_id,
            uuid,
            self.task.name,
            worker,
            request,
            queue=self.flow.own_queue or "",
            flow=self.flow,
        )
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
            for middleware in self.flow.middleware:
                try:
                    middleware.after_task(run, state)
                except Exception:
                    logger.exception("sessionflow middleware %r failed after %s", middleware, uuid)

    def _refuse(self, uuid: str, args: Any, kwargs: Any, request: Any, session_id: str) -> Any:
        """Fail the task without running it: store why as its result."""
        error: SessionFlowError
        try:
            found = self.flow.store.statuses([session_id]).get(session_id)
        except SessionFlowError:
            found = None
        if found is not None and found[0].ended:
            error = ended_error(session_id, found[0].value, found[1])
        else:
            error = SessionTaskRefused(
                f"task {uuid} of session {session_id} reached a worker that does not hold "
                "that session; it did not run",
                session_id,
            )
        setattr(error, REFUSED, True)
        logger.info("not running %s[%s]: %s", self.task.name, uuid, error)
        context = Context(request, args=args, kwargs=kwargs, called_directly=False)
        self.task.backend.mark_as_failure(uuid, error, request=context)
        try:
            raise error
        except type(error):
            einfo = ExceptionInfo()
        return trace_ok_t(einfo, TraceInfo(states.FAILURE, error), 0.0, None)


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

"""The worker main process's gate: session tasks are checked in memory as they arrive.

Two hooks, both in the main process, both without a store round trip:

- ``WorkController.process_task`` (every request Celery is about to hand to the
  pool): a session task runs only if its signature header proves it was sent
  through its session, and only if this worker holds that session open; any
  other gets its error as result and is acknowledged without reaching the pool.
- the pool's ``apply_async`` callbacks (start, end): the live view counts what
  runs, and the writer buffers the run for the history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionWithTraceback
from celery import states
from celery.exceptions import Ignore, Reject, Retry
from celery.worker.state import task_ready

from .. import tokens
from ..canvas import SESSION_HEADER, SIG_HEADER
from ..enums import RUN_STARTED
from ..errors import SessionFlowError, SessionTaskRefused, ended_error
from ..records import Run, utcnow
from .throttle import TaskLimiter
from .tracing import REFUSED

if TYPE_CHECKING:
    from ..flow import SessionFlow
    from .live import LiveSessions
    from .writer import Writer

logger = logging.getLogger("sessionflow.worker")
MAX_ERROR = 2000
REFUSED_STATE = "REFUSED"  # what observers hear for a session task that did not run


class Gate:
    """Admits session tasks into the pool and follows them to their end."""

    def __init__(self, flow: SessionFlow, live: LiveSessions, writer: Writer) -> None:
        self.flow = flow
        self.live = live
        self.writer = writer
        self.refused = 0
        self.limiter = TaskLimiter()  # --session-task-limits (configured by SessionWorker)
        # Operations hook: (session id, final state) of every session task this worker
        # ended, REFUSED for one that did not run (main process; metrics).
        self.observers: list[Callable[[str, str], None]] = []

    # -- arrival --------------------------------------------------------------------

    def wrap_process_task(self, process_task: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def gated(req: Any) -> Any:
            headers = req.request_dict
            session_id = headers.get(SESSION_HEADER)
            if not session_id:
                return process_task(req)
            error = self.check(session_id, req.id, headers.get(SIG_HEADER))
            if error is not None:
                return self.refuse(req, error)
            if self.limiter.limits:
                return self.limiter.submit(req, process_task)
            return process_task(req)

        gated.__wrapped__ = process_task  # type: ignore[attr-defined]
        return gated

    def check(self, session_id: Any, task_id: str, signature: Any) -> SessionFlowError | None:
        """None if the task may run here, else the error it ends with."""
        if not isinstance(session_id, str) or not tokens.task_signed(
            self.flow.signing_key, session_id, task_id, signature
        ):
            return SessionTaskRefused(
                f"task {task_id} claims session {str(session_id)[:64]!r} but was not sent "
                "through it (its signature header is missing or wrong); it did not run",
                str(session_id)[:64],
            )
        if self.live.arrived(session_id, task_id):
            return None
        known = self.live.ended(session_id)
        if known is None:
            try:
                found = self.flow.store.statuses([session_id]).get(session_id)
            except SessionFlowError as exc:
                return exc
            if found is None or not found[0].ended:
                return SessionTaskRefused(
                    f"task {task_id} of session {session_id} reached worker "
                    f"{self.live.nodename}, which does not hold that session; it did not run",
                    session_id,
                )
            known = (found[0].value, found[1] or "")
        return ended_error(session_id, known[0], known[1])

    def refuse(self, req: Any, error: Exception) -> None:
        """End a request without running it: its error is its result."""
        self.refused += 1
        self._observe(str(req.request_dict.get(SESSION_HEADER) or ""), REFUSED_STATE)
        logger.info("not running %s[%s]: %s", req.name, req.id, error)
        task_ready(req)
        try:
            req.task.backend.mark_as_failure(
                req.id, error, request=req._context, store_result=req.store_errors
            )
        finally:
            req.send_event("task-failed", exception=repr(error), traceback="")
            req.acknowledge()

    # -- start and end ----------------------------------------------------------------

    def wrap_apply_async(self, apply_async: Callable[..., Any]) -> Callable[..., Any]:
        def follow(target: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            request = args[2] if isinstance(args, (list, tuple)) and len(args) > 2 else None
            session_id = request.get(SESSION_HEADER) if isinstance(request, dict) else None
            if session_id and request is not None and self.live.get(session_id) is not None:
                self._follow(session_id, args[1], request, options)
            if session_id and self.limiter.limits:
                self.limiter.follow(args[1], options)
            return apply_async(target, args, kwargs, **options)

        follow.__wrapped__ = apply_async  # type: ignore[attr-defined]
        return follow

    def _follow(
        self, session_id: str, task_id: str, request: dict[str, Any], options: dict[str, Any]
    ) -> None:
        attempt = int(request.get("retries") or 0)
        name = request.get("task")
        worker = self.live.nodename
        began: list[Any] = []

        def run(state: str, error: str | None = None, finished: bool = True) -> Run:
            started_at = began[0] if began else utcnow()
            return Run(
                task_id,
                attempt,
                session_id,
                name,
                state,
                worker,
                started_at,
                utcnow() if finished else None,
                error[:MAX_ERROR] if error else None,
            )

        def on_accepted(*args: Any, **kwargs: Any) -> None:
            began.append(utcnow())
            self.live.started(session_id, task_id)
            self.writer.started((task_id, attempt), lambda: run(RUN_STARTED, finished=False))

        def on_result(result: Any, *args: Any, **kwargs: Any) -> None:
            try:
                failed, retval = result[0], result[1]
            except (TypeError, IndexError):
                failed, retval = False, None
            exc = _unwrap(getattr(retval, "exception", None)) if failed else None
            if failed and getattr(exc, REFUSED, False):
                self.live.finished(session_id, task_id)  # the gate in the pool said no
                self._observe(session_id, REFUSED_STATE)
                return
            if not failed:
                self._ended(session_id, task_id, run(states.SUCCESS))
            elif isinstance(exc, Retry):
                self._ended(session_id, task_id, run(states.RETRY, _describe(exc.exc or exc)))
            elif isinstance(exc, Ignore):
                self._ended(session_id, task_id, run(states.IGNORED))
            elif isinstance(exc, Reject):
                self._ended(session_id, task_id, run(states.REJECTED, _describe(exc)))
            else:
                self._ended(session_id, task_id, run(states.FAILURE, _describe(exc)))

        def on_error(exc_info: Any, *args: Any, **kwargs: Any) -> None:
            exc = _unwrap(getattr(exc_info, "exception", exc_info))
            self._ended(session_id, task_id, run(states.FAILURE, _describe(exc)))

        _chain(options, "accept_callback", on_accepted)
        _chain(options, "callback", on_result)
        _chain(options, "error_callback", on_error)

    def _ended(self, session_id: str, task_id: str, run: Run) -> None:
        self.writer.finished(run)
        self.live.finished(session_id, task_id)
        self._observe(session_id, run.state)

    def _observe(self, session_id: str, state: str) -> None:
        for observer in self.observers:
            try:
                observer(session_id, state)
            except Exception:
                logger.exception("sessionflow: task observer %r failed", observer)


def _chain(options: dict[str, Any], name: str, ours: Callable[..., None]) -> None:
    """Run ``ours`` before Celery's own callback ``name``; ours never breaks theirs."""
    theirs = options.get(name)

    def both(*args: Any, **kwargs: Any) -> Any:
        try:
            ours(*args, **kwargs)
        except Exception:
            logger.exception("sessionflow: %s hook failed", name)
        if theirs is not None:
            return theirs(*args, **kwargs)
        return None

    options[name] = both


def _unwrap(exc: Any) -> Any:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _describe(exc: Any) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}"

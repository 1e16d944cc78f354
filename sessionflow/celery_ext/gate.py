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
        self.observe(str(req.request_dict.get(SESSION_HEADER) or ""), REFUSED_STATE)
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
            if session_id:
                if request is not None and self.live.get(session_id) is not None:
                    _Followed(self, session_id, args[1], request, options)
                if self.limiter.limits:
                    self.limiter.follow(args[1], options)
            return apply_async(target, args, kwargs, **options)

        follow.__wrapped__ = apply_async  # type: ignore[attr-defined]
        return follow

    def ended(self, run: Run) -> None:
        self.writer.finished(run)
        self.live.finished(run.session_id, run.task_id)
        self.observe(run.session_id, run.state)

    def observe(self, session_id: str, state: str) -> None:
        for observer in self.observers:
            try:
                observer(session_id, state)
            except Exception:
                logger.exception("sessionflow: task observer %r failed", observer)


class _Followed:
    """One session task handed to the pool: its start and end, seen in the main process.

    Its bound methods replace the pool callbacks ``accept_callback``, ``callback`` and
    ``error_callback``: ours runs first (a failure of ours is logged, never breaks
    Celery's), then Celery's own. One small object per task: this runs on the event loop
    for every session task.
    """

    __slots__ = (
        "accepted_cb",
        "attempt",
        "began",
        "error_cb",
        "gate",
        "name",
        "result_cb",
        "session_id",
        "task_id",
    )

    def __init__(
        self,
        gate: Gate,
        session_id: str,
        task_id: str,
        request: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        self.gate = gate
        self.session_id = session_id
        self.task_id = task_id
        self.attempt = int(request.get("retries") or 0)
        self.name = request.get("task")
        self.began: Any = None
        self.accepted_cb = options.get("accept_callback")
        self.result_cb = options.get("callback")
        self.error_cb = options.get("error_callback")
        options["accept_callback"] = self.on_accepted
        options["callback"] = self.on_result
        options["error_callback"] = self.on_error

    def run(self, state: str, error: str | None = None, finished: bool = True) -> Run:
        return Run(
            self.task_id,
            self.attempt,
            self.session_id,
            self.name,
            state,
            self.gate.live.nodename,
            self.began or utcnow(),
            utcnow() if finished else None,
            error[:MAX_ERROR] if error else None,
        )

    def start_row(self) -> Run:
        return self.run(RUN_STARTED, finished=False)

    def on_accepted(self, *args: Any, **kwargs: Any) -> Any:
        try:
            self.began = utcnow()
            self.gate.live.started(self.session_id, self.task_id)
            self.gate.writer.started((self.task_id, self.attempt), self.start_row)
        except Exception:
            logger.exception("sessionflow: accept_callback hook failed")
        return None if self.accepted_cb is None else self.accepted_cb(*args, **kwargs)

    def on_result(self, result: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            self._result(result)
        except Exception:
            logger.exception("sessionflow: callback hook failed")
        return None if self.result_cb is None else self.result_cb(result, *args, **kwargs)

    def on_error(self, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            exc = _unwrap(getattr(exc_info, "exception", exc_info))
            self.gate.ended(self.run(states.FAILURE, _describe(exc)))
        except Exception:
            logger.exception("sessionflow: error_callback hook failed")
        return None if self.error_cb is None else self.error_cb(exc_info, *args, **kwargs)

    def _result(self, result: Any) -> None:
        try:
            failed, retval = result[0], result[1]
        except (TypeError, IndexError):
            failed, retval = False, None
        if not failed:
            self.gate.ended(self.run(states.SUCCESS))
            return
        exc = _unwrap(getattr(retval, "exception", None))
        if getattr(exc, REFUSED, False):  # the gate in the pool said no: it did not run
            self.gate.live.finished(self.session_id, self.task_id)
            self.gate.observe(self.session_id, REFUSED_STATE)
            return
        if isinstance(exc, Retry):
            run = self.run(states.RETRY, _describe(exc.exc or exc))
        elif isinstance(exc, Ignore):
            run = self.run(states.IGNORED)
        elif isinstance(exc, Reject):
            run = self.run(states.REJECTED, _describe(exc))
        else:
            run = self.run(states.FAILURE, _describe(exc))
        self.gate.ended(run)


def _unwrap(exc: Any) -> Any:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


def _describe(exc: Any) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}"

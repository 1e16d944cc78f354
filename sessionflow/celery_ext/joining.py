"""Tasks sent from inside a session task join that session (Celery's idiom keeps working).

``app.send_task`` is wrapped: a message sent while a session task runs in this
thread, without session headers of its own and outside ``sessionflow.detached()``,
is registered with the session (one statement, counting a turn), signed and
routed to the session's worker. A refused registration (the session ended, its
turns are used up) raises before anything is published. Everything else passes
through untouched, except ``celery.chord_unlock`` (Celery copies a chord body's
headers onto it, but it is Celery's own poller, not a task of the session) and
sessionflow's own ``sessionflow.end_session``: they are sent without session headers.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from celery.utils import uuid

from .. import limits, tokens
from ..canvas import HEADERS, QUEUE_HEADER, SESSION_HEADER, SIG_HEADER, is_detached
from ..records import Dispatch
from ..runtime import current_run

if TYPE_CHECKING:
    from ..flow import SessionFlow

_MARK = "_sessionflow_joining"
#: Celery machinery that copies a chord body's headers but runs on its own (any worker).
END_TASK = "sessionflow.end_session"  # completes a session when its canvas is done
_PLAIN_TASKS = frozenset({"celery.chord_unlock", END_TASK})


def wrap_send_task(flow: SessionFlow) -> None:
    """Make ``flow.app.send_task`` join the running session (idempotent)."""
    app = flow.app
    send_task = app.send_task
    if getattr(send_task, _MARK, False):
        return

    @functools.wraps(send_task)
    def joining(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if name in _PLAIN_TASKS:
            headers = options.get("headers")
            if headers:
                options["headers"] = {k: v for k, v in headers.items() if k not in HEADERS}
            return send_task(name, args, kwargs, **options)
        run = current_run()
        if run is None or not run.queue or is_detached():
            return send_task(name, args, kwargs, **options)
        headers = options.get("headers") or {}
        if SESSION_HEADER in headers:
            return send_task(name, args, kwargs, **options)
        task_id = options.get("task_id") or uuid()
        limits.text("task_id", task_id)
        if run.flow.store.dispatch(Dispatch(run.session_id, ((task_id, name),))) is None:
            from ..session import Session

            raise Session(run.flow, run.session_id)._refusal(1)
        options["task_id"] = task_id
        options["headers"] = {
            **headers,
            SESSION_HEADER: run.session_id,
            QUEUE_HEADER: run.queue,
            SIG_HEADER: tokens.sign_task(run.flow.signing_key, run.session_id, task_id),
        }
        return send_task(name, args, kwargs, **options)

    setattr(joining, _MARK, True)
    app.send_task = joining

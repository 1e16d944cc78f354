"""The worker side of sessionflow: bootsteps, a worker option and a task tracer."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery import signals
from click import Option

from .steps import Admission, SessionWorker
from .tracing import Middleware, TaskRun, current_run, wrap_tracers

if TYPE_CHECKING:
    from ..flow import SessionFlow

__all__ = ["Admission", "Middleware", "SessionWorker", "TaskRun", "current_run", "install"]


def install(flow: SessionFlow) -> None:
    """Add the worker option, bootsteps and child-process hook to ``flow.app``."""
    app = flow.app
    app.user_options["worker"].add(
        Option(
            ["--max-sessions"],
            type=int,
            default=None,
            help="sessionflow: most sessions this worker process runs at once "
            "(overrides sessionflow_max_concurrent_sessions).",
        )
    )
    app.steps["worker"].add(SessionWorker)
    app.steps["consumer"].add(Admission)

    def _on_process_init(**_: Any) -> None:
        # prefork children rebuild every task's tracer right before this signal.
        if flow.worker_nodename:
            wrap_tracers(flow, flow.worker_nodename)

    signals.worker_process_init.connect(_on_process_init, weak=False)

    def _on_shutting_down(sender: str | None = None, **_: Any) -> None:
        # Runs inside the SIGTERM handler: stop admitting at once, and end the
        # sessions from a thread so an interrupted store transaction cannot deadlock.
        if flow.worker_nodename is None or sender != flow.worker_nodename:
            return
        flow.worker_closing = True
        threading.Thread(
            target=flow.lifecycle.worker_stopping, args=(sender,), name="sessionflow-stop"
        ).start()

    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)

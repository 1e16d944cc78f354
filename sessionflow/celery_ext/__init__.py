"""The worker side of sessionflow: bootsteps, a worker option and a task tracer."""

from __future__ import annotations

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

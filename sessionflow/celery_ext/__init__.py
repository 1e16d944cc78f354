"""The worker side of sessionflow: bootsteps, a worker option, the gate and the tracer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import signals
from click import IntRange, Option

from ..middleware import Middleware
from ..runtime import TaskRun, current_run
from . import control  # noqa: F401  (registers the remote-control commands)
from .admitting import Admission
from .joining import wrap_send_task
from .steps import SessionWorker
from .tracing import wrap_tracers

if TYPE_CHECKING:
    from ..flow import SessionFlow

__all__ = ["Admission", "Middleware", "SessionWorker", "TaskRun", "current_run", "install"]


def install(flow: SessionFlow) -> None:
    """Add the worker option, bootsteps, child-process hook and joining to ``flow.app``."""
    from ..branches import BranchMiddleware

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
    for flag, text in (
        (
            "--session-resources",
            "capacities this worker offers sessions, e.g. 'gpu=2,browser=8' "
            "(overrides sessionflow_session_resources; 'sessions' is --max-sessions).",
        ),
        (
            "--session-labels",
            "labels sessions' constraints and preferences match, e.g. 'zone=eu,model=llama3' "
            "(overrides sessionflow_session_labels).",
        ),
        (
            "--session-task-limits",
            "most session tasks of a name running at once here, e.g. 'proj.render=1'; "
            "the others wait in their queue (overrides sessionflow_session_task_limits).",
        ),
    ):
        app.user_options["worker"].add(Option([flag], default=None, help=f"sessionflow: {text}"))
    app.steps["worker"].add(SessionWorker)
    app.steps["consumer"].add(Admission)
    _install_operations(app)
    if not any(isinstance(m, BranchMiddleware) for m in flow.middleware):
        flow.middleware.append(BranchMiddleware(flow))
    wrap_send_task(flow)
    _register_end_task(flow)

    def _on_process_init(**_: Any) -> None:
        # prefork children rebuild every task's tracer right before this signal.
        if flow.worker_nodename:
            wrap_tracers(flow, flow.worker_nodename)

    def _on_shutting_down(sender: str | None = None, **_: Any) -> None:
        # Runs inside the SIGTERM handler: stop admitting at once; the ticker thread
        # ends the sessions (a store transaction cannot be interrupted here).
        if flow.worker_nodename is None or sender != flow.worker_nodename:
            return
        flow.worker_closing = True
        step = _step(flow)
        if step is not None:
            step.ticker.request_shutdown()

    def _on_shutdown(**_: Any) -> None:
        step = _step(flow)
        if step is not None and flow.live is not None and flow.live.in_this_process():
            step.writer.stop()  # after the pool: the ends of the last tasks are in
            step.ticker.stop()  # its heartbeats told sweepers the pool was still finishing

    signals.worker_process_init.connect(_on_process_init, weak=False)
    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
    signals.worker_shutdown.connect(_on_shutdown, weak=False)


def _install_operations(app: Any) -> None:
    """Events, signals, metrics, logs and banner (:mod:`.observe`), and their options."""
    from .observe import Observer, TaskEvents

    app.user_options["worker"].add(
        Option(
            ["--sessions-metrics-port"],
            type=IntRange(0, 65535),
            default=None,
            help="sessionflow: serve Prometheus metrics of this worker's sessions on this "
            "port (0: any free port, logged; needs sessionflow[prometheus]).",
        )
    )
    app.user_options["worker"].add(
        Option(
            ["--sessions-metrics-addr"],
            default=None,
            help="sessionflow: address the metrics port listens on (default 0.0.0.0).",
        )
    )
    app.steps["worker"].add(Observer)
    app.steps["consumer"].add(TaskEvents)


def _step(flow: SessionFlow) -> SessionWorker | None:
    return getattr(flow, "worker_step", None)


def _register_end_task(flow: SessionFlow) -> None:
    """The task ``apply_async(..., complete_when_done=True)`` chains after a canvas."""
    from ..enums import Reason, SessionStatus
    from .joining import END_TASK

    if END_TASK in flow.app.tasks:
        return

    @flow.app.task(name=END_TASK, shared=False, ignore_result=True)  # type: ignore[untyped-decorator]
    def end_session(session_id: str, *_: Any, **__: Any) -> bool:
        """Complete a session whose canvas finished (on success and on failure)."""
        return flow.end_session(session_id, SessionStatus.CLOSED, Reason.COMPLETED.value)

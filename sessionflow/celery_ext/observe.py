"""Operating a worker: events, signals, metrics, logs and banner, wired to its sessions.

``Observer`` (worker blueprint, after ``SessionWorker``) subscribes to the live
view's and the gate's hooks and fans each change out to Celery events, the
signals of :mod:`sessionflow.signals` and, with ``--sessions-metrics-port``, the
Prometheus metrics. ``TaskEvents`` (consumer blueprint, after Celery's ``Events``)
makes the consumer's task events carry the session id; it runs again whenever
the consumer reconnects and makes a new event dispatcher.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery import signals as celery_signals

from .. import signals
from ..events import (
    SESSION_CLOSED,
    SESSION_FAILED,
    SESSION_OPENED,
    SessionEvents,
    TaskEventTagger,
    task_events_on,
)
from ..logs import extend_banner, install_record_factory
from ..metrics import WorkerMetrics
from ..resources import spec_text

if TYPE_CHECKING:
    from ..records import Ended
    from .live import Live
    from .steps import SessionWorker

logger = logging.getLogger("sessionflow.worker")


class Observer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Events, signals and metrics of this worker's sessions."""

    label = "sessionflow observer"
    requires = ("sessionflow.celery_ext.steps:SessionWorker",)

    def __init__(
        self,
        w: Any,
        sessions_metrics_port: int | None = None,
        sessions_metrics_addr: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(w, **kwargs)
        worker: SessionWorker = w.sessionflow
        self.worker = worker
        self.w = w
        self.live = worker.live
        self.nodename = worker.nodename
        self.metrics_port = sessions_metrics_port
        self.metrics_addr = sessions_metrics_addr or "0.0.0.0"
        self.metrics = WorkerMetrics(self.live) if sessions_metrics_port is not None else None
        self.events = SessionEvents(w.app, self.nodename, self._task_events_on)
        self.tagger = TaskEventTagger(self._dispatcher)
        worker.observer = self
        install_record_factory()  # before the pool forks: its processes inherit it
        extend_banner(w, self.banner)
        # Hooks are in place before SessionWorker.start resumes sessions of an earlier
        # process, so those count as opened too.
        self.live.on_open.append(self.opened)
        self.live.on_end.append(self.ended)
        self.live.on_admission.append(self.admission)
        if self.metrics is not None:
            worker.gate.observers.append(self.metrics.task_run)
        celery_signals.task_received.connect(self.tagger.on_task_received, weak=False)
        celery_signals.worker_process_init.connect(self._in_pool_process, weak=False)
        celery_signals.worker_shutdown.connect(self._on_shutdown, weak=False)

    # -- what the worker is like -------------------------------------------------------

    def _dispatcher(self) -> Any:
        consumer = getattr(self.w, "consumer", None)
        return getattr(consumer, "event_dispatcher", None)

    def _task_events_on(self) -> bool:
        dispatcher = self._dispatcher()
        if dispatcher is None:  # the consumer has not started yet
            return bool(getattr(self.w, "task_events", False))
        return task_events_on(dispatcher)

    def banner(self) -> list[tuple[str, str]]:
        flow, worker = self.worker.flow, self.worker
        lines = [
            ("session queue", worker.queue),
            (
                "creation queues",
                f"{flow.config.creation_queue}, {flow.config.worker_creation_queue(self.nodename)}",
            ),
            ("max sessions", str(self.live.cap)),
        ]
        limiter = getattr(self.worker.gate, "limiter", None)
        limits = limiter.limits if limiter is not None else {}
        for name, values in (
            ("resources", self.live.resources),
            ("labels", self.live.labels),
            ("task limits", limits),
        ):
            if values:
                lines.append((name, spec_text(values)))
        lines.append(("store", flow.config.masked_url))
        if self.metrics_port is not None:
            port = self.metrics_port or "<a free port, named in the log>"
            lines.append(("metrics", f"http://{self.metrics_addr}:{port}/metrics"))
        return lines

    # -- the step ------------------------------------------------------------------------

    def start(self, w: Any) -> None:
        if self.metrics is not None and self.metrics_port is not None:
            self.metrics.serve(self.metrics_port, self.metrics_addr)
            logger.info(
                "sessionflow: metrics of %s on http://%s:%d/metrics",
                self.nodename,
                self.metrics_addr,
                self.metrics.port,
            )

    def stop(self, w: Any) -> None:
        pass  # the last sessions end after this step stops: see _on_shutdown

    def _on_shutdown(self, **_: Any) -> None:
        if not self.live.in_this_process():
            return
        self.events.close()
        if self.metrics is not None:
            self.metrics.stop()
        celery_signals.task_received.disconnect(self.tagger.on_task_received)
        celery_signals.worker_process_init.disconnect(self._in_pool_process)
        celery_signals.worker_shutdown.disconnect(self._on_shutdown)

    def _in_pool_process(self, **_: Any) -> None:
        install_record_factory()
        if self.metrics is not None:
            self.metrics.forget_in_child()

    # -- changes of the live view ----------------------------------------------------

    def _fields(self, live: Live) -> dict[str, Any]:
        record = live.record
        return {
            "session_id": record.id,
            "user_id": record.user_id,
            "agent_id": record.agent_id,
            "open": self.live.count(),
            "cap": self.live.cap,
        }

    def opened(self, live: Live) -> None:
        fields = self._fields(live)
        self.events.send(SESSION_OPENED, reason=None, **fields)
        if self.metrics is not None:
            self.metrics.opened(live)
        signals.session_opened.send(
            sender=self.nodename, hostname=self.nodename, reason=None, **fields
        )

    def ended(self, live: Live, ended: Ended | None, status: str, reason: str) -> None:
        fields = self._fields(live)
        failed = status == "failed"
        self.events.send(SESSION_FAILED if failed else SESSION_CLOSED, reason=reason, **fields)
        if self.metrics is not None:
            self.metrics.ended(status, reason)
        signal = signals.session_failed if failed else signals.session_closed
        signal.send(sender=self.nodename, hostname=self.nodename, reason=reason, **fields)

    def admission(self, paused: bool) -> None:
        signal = signals.session_admission_paused if paused else signals.session_admission_resumed
        signal.send(
            sender=self.nodename,
            hostname=self.nodename,
            open=self.live.count(),
            cap=self.live.cap,
        )


class TaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    """Makes the consumer's task events of session tasks carry ``session_id``."""

    label = "sessionflow task events"
    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c: Any) -> None:
        observer = getattr(getattr(c.controller, "sessionflow", None), "observer", None)
        if observer is not None and c.event_dispatcher is not None:
            observer.tagger.wrap(c.event_dispatcher)


__all__ = ["Observer", "TaskEvents"]

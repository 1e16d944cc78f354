"""Prometheus metrics of one worker, served from its main process.

``celery -A proj worker --sessions-metrics-port 9808`` (needs the
``sessionflow[prometheus]`` extra) serves ``/metrics`` on that port. Every metric
is updated in the worker main process (admission, the gate's start and end
callbacks, the ticker), where the live view of the worker's sessions is: prefork
children change nothing, so no multiprocess mode is needed, and each child closes
the listening socket it inherited.

=============================================  =======  ================================
metric                                         type     labels
=============================================  =======  ================================
``sessionflow_sessions_open``                  gauge    ``hostname``
``sessionflow_sessions_cap``                   gauge    ``hostname``
``sessionflow_admission_paused``               gauge    ``hostname`` (1: not taking requests)
``sessionflow_admission_wait_seconds``         histo.   ``hostname`` (creation to admission)
``sessionflow_sessions_opened_total``          counter  ``hostname``
``sessionflow_sessions_ended_total``           counter  ``hostname``, ``state``, ``reason``
``sessionflow_session_task_runs_total``        counter  ``hostname``, ``state``
=============================================  =======  ================================

``reason`` is one of :class:`~sessionflow.enums.Reason` (``completed``,
``execution_timeout``, ``ttl``, ``idle_timeout``, ``worker_shutdown`` …), or ``other``
for a reason an operator wrote (``celery sessions fail --reason``).
``state`` of a task run is its Celery state (``SUCCESS``, ``FAILURE``, ``RETRY``,
``IGNORED``, ``REJECTED``), or ``REFUSED`` for a task the gate did not let run (its
session had ended, or it was not sent through it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .enums import Reason
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .celery_ext.live import Live, LiveSessions

_REASONS = frozenset(r.value for r in Reason)

#: Seconds from ``create_session`` to admission: most admissions take milliseconds;
#: a full cluster makes clients wait up to their ``creation_timeout``.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            '--sessions-metrics-port needs prometheus_client: pip install "sessionflow[prometheus]"'
        ) from None
    return prometheus_client


class WorkerMetrics:
    """The metrics of one worker process, in a registry of their own."""

    def __init__(self, live: LiveSessions) -> None:
        client = _client()
        self.live = live
        self.registry = client.CollectorRegistry(auto_describe=True)
        host = {"hostname": live.nodename}
        r = self.registry

        def gauge(name: str, doc: str) -> Any:
            return client.Gauge(name, doc, ["hostname"], registry=r).labels(**host)

        gauge("sessionflow_sessions_open", "Sessions this worker has open.").set_function(
            live.count
        )
        gauge("sessionflow_sessions_cap", "Most sessions this worker opens at once.").set_function(
            lambda: live.cap
        )
        gauge(
            "sessionflow_admission_paused", "1 while this worker takes no creation requests."
        ).set_function(lambda: 1 if live.admission_paused else 0)
        self.wait = client.Histogram(
            "sessionflow_admission_wait_seconds",
            "Seconds from create_session to this worker's admission.",
            ["hostname"],
            buckets=WAIT_BUCKETS,
            registry=r,
        ).labels(**host)
        self.opened_total = client.Counter(
            "sessionflow_sessions_opened", "Sessions this worker opened.", ["hostname"], registry=r
        ).labels(**host)
        self.ended_total = client.Counter(
            "sessionflow_sessions_ended",
            "Sessions of this worker that ended, by state and reason.",
            ["hostname", "state", "reason"],
            registry=r,
        )
        self.runs_total = client.Counter(
            "sessionflow_session_task_runs",
            "Session task runs this worker ended, by Celery state (REFUSED: did not run).",
            ["hostname", "state"],
            registry=r,
        )
        self._server: Any = None
        self._lock = threading.Lock()

    # -- updates (worker main process) ----------------------------------------------

    def opened(self, live: Live) -> None:
        self.opened_total.inc()
        record = live.record
        if record.opened_at is not None:
            wait = (record.opened_at - record.created_at).total_seconds()
            self.wait.observe(max(wait, 0.0))

    def ended(self, state: str, reason: str) -> None:
        # An operator's free-text reason would make a label value per incident.
        known = reason if reason in _REASONS else "other"
        self.ended_total.labels(self.live.nodename, state, known).inc()

    def task_run(self, session_id: str, state: str) -> None:
        self.runs_total.labels(self.live.nodename, state).inc()

    # -- the endpoint -----------------------------------------------------------------

    def serve(self, port: int, addr: str) -> None:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread."""
        try:
            self._server, _ = _client().start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(
                f"--sessions-metrics-port {port}: cannot listen on {addr}:{port} ({exc}); "
                "give each worker on a machine a port of its own"
            ) from None

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def forget_in_child(self) -> None:
        """In a forked pool process: close the inherited listening socket (the server
        thread did not survive the fork; the parent keeps serving)."""
        if self._server is not None:
            self._server.socket.close()
            self._server = None

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


__all__ = ["WAIT_BUCKETS", "WorkerMetrics"]

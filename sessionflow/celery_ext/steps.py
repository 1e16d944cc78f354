"""The worker bootstep: the session queue, the gate, recovery at start.

``SessionWorker`` runs in the worker blueprint, after the pool is made and
before the consumer starts, so a worker whose node name is taken refuses to
start before it consumes anything. Its consumer step, :class:`.admitting.Admission`,
takes creation requests while the worker is below its cap.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.utils.nodenames import anon_nodename

from ..canvas import make_queue
from ..enums import Reason, SessionStatus
from ..errors import ConfigurationError
from ..placement import Needs
from ..records import SessionRecord, utcnow
from ..resources import WorkerSpec
from ..sweeper import DISPATCH_GRACE
from .gate import Gate
from .live import LiveSessions
from .ticker import Ticker
from .tracing import wrap_tracers
from .writer import Writer

if TYPE_CHECKING:
    from ..flow import SessionFlow

logger = logging.getLogger("sessionflow.worker")


def _opened(record: SessionRecord) -> datetime:
    return record.opened_at or record.created_at


def _pid_alive(host: str | None, pid: int, heartbeat_age: float, stale_after: float) -> bool:
    """Whether the process in a worker row still runs (this machine: ask the OS)."""
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return heartbeat_age < stale_after


class SessionWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Adds the session queue, installs the gate, recovers what an earlier process left."""

    label = "sessionflow"
    requires = ("celery.worker.components:Pool",)

    def __init__(
        self,
        w: Any,
        max_sessions: int | None = None,
        session_resources: str | None = None,
        session_labels: str | None = None,
        session_task_limits: str | None = None,
        **kwargs: Any,
    ) -> None:
        from ..flow import SessionFlow

        super().__init__(w, **kwargs)
        flow = SessionFlow.of(w.app)
        assert flow is not None
        self.flow: SessionFlow = flow
        cap = flow.config.max_concurrent_sessions if max_sessions is None else max_sessions
        if cap < 1:
            raise ConfigurationError(f"--max-sessions must be at least 1, got {cap}")
        self.cap = cap
        self.nodename: str = w.hostname
        queue = make_queue(flow.config.worker_queue(w.hostname))
        w.app.amqp.queues.select_add(queue)
        self.queue = queue.name
        self.writer = Writer(flow.store, flow.config.flush_interval)
        spec = WorkerSpec.read(flow.config, session_resources, session_labels, session_task_limits)
        self.live = LiveSessions(
            w.hostname,
            queue.name,
            cap,
            flow.store,
            flow.resolver,
            self.writer.flush,
            resources=spec.resources,
            labels=spec.labels,
            claimed=lambda session_id, ids: self.writer.claimed(session_id, ids, w.hostname),
        )
        self.ticker = Ticker(flow, self.live)
        self.gate = Gate(flow, self.live, self.writer)
        self.gate.limiter.configure(spec.task_limits, lambda: getattr(w.consumer, "qos", None))
        # Pool processes forked later inherit these.
        flow.worker_nodename = w.hostname
        flow.live_dir = self.live.dir
        flow.own_queue = queue.name
        flow.live = self.live
        flow.worker_step = self
        w.sessionflow = self
        # A name made up for this process (Celery's embedded test worker) is never
        # used again: nothing would consume or delete its queues after it stops.
        self.anonymous = w.hostname == anon_nodename()

    def create(self, w: Any) -> None:
        w.process_task = self.gate.wrap_process_task(w.process_task)
        w.pool.apply_async = self.gate.wrap_apply_async(w.pool.apply_async)

    def start(self, w: Any) -> None:
        flow = self.flow
        wrap_tracers(flow, self.nodename)  # solo/threads pools run tasks in this process
        flow.store.register_worker(
            self.nodename,
            host=socket.gethostname(),
            pid=os.getpid(),
            queue=self.queue,
            max_sessions=self.cap,
            is_alive=lambda host, pid, age: _pid_alive(
                host, pid, age, 3 * flow.config.heartbeat_interval
            ),
            resources=self.live.resources,
            labels=self.live.labels,
        )
        self.recover()
        self.writer.start()
        self.ticker.start()
        logger.info(
            "sessionflow: %s admits up to %d sessions; session queue %s; store %s",
            self.nodename,
            self.cap,
            self.queue,
            flow.config.masked_url,
        )

    def recover(self) -> None:
        """Settle what an earlier process of this node name left behind.

        Tasks it was running are lost; sessions that survive a restart stay open
        with their queued tasks (including the ones it had prefetched); the others
        fail.
        """
        flow, store, resolver = self.flow, self.flow.store, self.flow.resolver
        for ended in store.lose_interrupted(self.nodename):
            resolver.resolve(ended)
        surviving = []
        for record in sorted(store.open_sessions(self.nodename), key=_opened):
            reason = Reason.WORKER_LOST
            if record.survive_restart:
                # In the order they opened, each against what is left: never over capacity.
                refusal = self.live.judge(Needs.of(record))
                if refusal is None:
                    surviving.append(record.id)
                    self.live.open(record)
                    continue
                reason = Reason.WORKER_CHANGED  # restarted with less, or other labels
                logger.warning(
                    "sessionflow: session %s cannot resume on %s (%s): %s",
                    record.id,
                    self.nodename,
                    reason.value,
                    refusal[1],
                )
            if store.end_session(
                record.id, SessionStatus.FAILED, reason.value, hostname=self.nodename
            ):
                self._settle(record.id)
        for session_id, _ in store.unsettled(self.nodename):
            self._settle(session_id)
        if not surviving:
            return
        own = make_queue(self.queue)
        settled = utcnow() - DISPATCH_GRACE
        seen = flow.queues.sort(own.name, lambda _session_id: own)
        for session_id in surviving:
            missing = store.lose_missing(session_id, seen, settled)
            if missing is not None:
                resolver.resolve(missing)

    def _settle(self, session_id: str) -> None:
        """Settle a session of an earlier process: nothing of it runs in this one."""
        ended = self.flow.store.settle(session_id, lose_started=True)
        if ended is not None:
            self.flow.resolver.resolve(ended)

    def stop(self, w: Any) -> None:
        """Warm or cold shutdown: end the sessions (once).

        The writer and the ticker's heartbeats keep going until ``worker_shutdown``:
        the pool stops after this step, the ends of its last tasks still have to be
        written, and until then a sweeper must not take its running tasks for lost.
        """
        self.ticker.request_shutdown()
        self.ticker.wait_shutdown(15)
        self.live.remove_dir()
        if self.anonymous:
            self.delete_queues()

    terminate = stop

    def delete_queues(self) -> None:
        """Delete this worker's session and creation queues, with their bindings.

        Only for a worker whose node name no later process will have: its sessions
        have ended or can never resume here, so nothing in these queues can run.
        """
        names = (self.queue, self.flow.config.worker_creation_queue(self.nodename))
        try:
            with self.flow.app.connection_for_write() as conn:
                for name in names:
                    queue = make_queue(name)(conn.default_channel)
                    queue.declare()  # kombu's virtual transports delete only what they know
                    queue.delete()
                    queue.exchange.delete()
        except Exception:
            logger.exception("sessionflow: could not delete the queues of %s", self.nodename)

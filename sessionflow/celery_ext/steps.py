"""Worker bootsteps: the session queue, the gate, recovery at start, admission.

``SessionWorker`` runs in the worker blueprint, after the pool is made and
before the consumer starts, so a worker whose node name is taken refuses to
start before it consumes anything. ``Admission`` runs in the consumer and takes
creation requests on the event loop while the worker is below its cap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.utils.nodenames import anon_nodename
from kombu.messaging import Consumer

from ..canvas import make_queue
from ..enums import Reason, SessionStatus
from ..errors import ConfigurationError, SessionFlowError
from ..placement import Needs, placed
from ..queues import request_is_live
from ..records import NewSession, SessionRecord, utcnow
from ..resources import WorkerSpec
from ..sweeper import DISPATCH_GRACE
from .gate import Gate
from .live import LiveSessions
from .ticker import Ticker
from .tracing import wrap_tracers
from .writer import Writer

if TYPE_CHECKING:
    from kombu.message import Message

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
        """Warm or cold shutdown: end the sessions (once), stop the ticker.

        The writer keeps going until ``worker_shutdown``: the pool stops after this
        step, and the ends of its last tasks still have to be written.
        """
        self.ticker.request_shutdown()
        self.ticker.wait_shutdown(15)
        self.ticker.stop()
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


class Admission(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumes the creation queues while this worker is below its cap."""

    label = "sessionflow admission"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.consumer: Consumer | None = None
        self.channel: Any = None
        self.paused = False
        self.timers: list[Any] = []

    def start(self, c: Any) -> None:
        worker: SessionWorker = c.controller.sessionflow
        self.worker = worker
        self.flow = worker.flow
        # Celery's Tasks step rebuilt every task's tracer just now (update_strategies):
        # wrap them again, for the solo and threads pools that trace in this process.
        wrap_tracers(self.flow, worker.nodename)
        self.live = worker.live
        self.channel = c.connection.channel()
        self.channel.basic_qos(0, 1, False)
        direct = make_queue(self.flow.config.worker_creation_queue(worker.nodename))
        self.consumer = Consumer(
            self.channel,
            queues=[self.flow.creation_queue, direct],
            callbacks=[self.on_request],
            accept=["json"],
            prefetch_count=1,
        )
        self.paused = True
        self._maybe_resume()
        if self.paused:
            self.live.set_admission_paused(True)
        self.timers = [
            c.timer.call_repeatedly(self.flow.config.admission_poll_interval, self._maybe_resume)
        ]

    def stop(self, c: Any) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        if self.consumer is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                self.consumer.cancel()
            self.consumer = None
        if self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.close()
            self.channel = None

    shutdown = stop

    def on_request(self, body: Any, message: Message) -> None:
        session_id = body.get("session_id") if isinstance(body, dict) else None
        if not isinstance(session_id, str) or len(session_id) > 64:
            logger.warning("sessionflow: dropping malformed creation request")
            message.ack()
            return
        if not request_is_live(body):
            message.ack()  # its client gave up: nothing to look up
            return
        placed, refusal = self._placed(body)
        if not placed and (self.flow.worker_closing or not self.live.has_room()):
            message.requeue()  # leave it for another worker
            self._pause()
            return
        if placed:  # addressed to this worker: answer at once, never requeue
            if self.flow.worker_closing:
                refusal = ("busy", "shutting down")
            if refusal is not None:
                message.ack()
                self._answer(body, {refusal[0]: refusal[1], "hostname": self.live.nodename})
                return
        try:
            record = self._admit(session_id, body.get("new"))
        except ValueError:
            logger.warning("sessionflow: dropping malformed creation request %s", session_id)
            message.ack()
            return
        except SessionFlowError:
            logger.exception("sessionflow: admission of %s failed; will retry", session_id)
            message.requeue()
            self._pause()
            return
        if record is None:
            message.ack()  # abandoned, admitted elsewhere, or addressed to another worker
            if placed:
                self._answer(body, {"taken": True, "hostname": self.live.nodename})
            return
        self.live.open(record)
        if body.get("move"):
            self.worker.ticker.adopt(session_id)  # its parked tasks come in off the loop
        # The waiting client hears first; the ack (a Redis round trip) follows. A crash in
        # between redelivers the request, which then finds the session open and is dropped.
        self._reply(body, record)
        message.ack()
        logger.info("sessionflow: admitted session %s", session_id)
        if not self.live.has_room():
            self._pause()

    def _placed(self, body: dict[str, Any]) -> tuple[bool, tuple[str, str] | None]:
        """(whether the request asks for placement, and if so this worker's refusal:
        ``("mismatch" | "busy", why)``, or None when it may open here now)."""
        spec, needs = body.get("new"), body.get("placed")
        if needs is None and not (isinstance(spec, dict) and placed(spec)):
            return False, None
        try:
            checked = Needs.checked(spec if isinstance(spec, dict) else needs)
        except ValueError:
            return True, ("mismatch", "malformed request")
        return True, self.live.judge(checked)

    def _answer(self, body: dict[str, Any], answer: dict[str, Any]) -> None:
        """Tell a placing client this worker's verdict (it tries the next worker at once)."""
        reply = body.get("reply")
        if not isinstance(reply, str) or not reply.startswith("sessionflow.created."):
            return
        try:
            self.flow.app.backend.store_result(reply, answer, "SUCCESS")
        except Exception:  # the client's wait for this worker times out instead
            logger.exception("sessionflow: could not answer creation request %s", reply)

    def _admit(self, session_id: str, spec: Any) -> Any:
        """Open the session here: insert a new one, or take a pending (moving) one."""
        nodename, queue = self.live.nodename, self.live.queue
        if spec is None:
            return self.flow.store.admit(session_id, nodename, queue)
        new = NewSession.from_message(spec)
        if new.id != session_id or new.target_worker not in (None, nodename):
            return None  # addressed to another worker (recreate)
        return self.flow.store.open_new(new, nodename, queue)

    def _reply(self, body: dict[str, Any], record: Any) -> None:
        on_open = body.get("on_open")
        if isinstance(on_open, dict):
            try:  # the caller's callback, with the session id, as a plain task
                self.flow.app.signature(on_open).apply_async(args=(record.id,))
            except Exception:
                logger.exception("sessionflow: could not send on_open of %s", record.id)
        reply = body.get("reply")
        if not isinstance(reply, str) or not reply.startswith("sessionflow.created."):
            return
        try:
            self.flow.app.backend.store_result(
                reply, {"session_id": record.id, "hostname": record.hostname}, "SUCCESS"
            )
        except Exception:  # the client falls back to the store when its wait ends
            logger.exception("sessionflow: could not answer the creation of %s", record.id)

    def _pause(self) -> None:
        if not self.paused and self.consumer is not None:
            # Set first: with RabbitMQ, cancel() waits for the broker and may deliver
            # another request into on_request, which must not cancel a second time.
            self.paused = True
            self.consumer.cancel()
            self.live.set_admission_paused(True)

    def _maybe_resume(self) -> None:
        if not self.paused or self.consumer is None or self.flow.worker_closing:
            return
        if self.live.has_room():
            self.consumer.consume()
            self.paused = False
            self.live.set_admission_paused(False)

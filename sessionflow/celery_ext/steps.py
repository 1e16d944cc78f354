"""Worker bootsteps: the session queue, admission of new sessions, liveness.

Everything here runs in the worker's main process, in its event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu.messaging import Consumer

from ..canvas import make_queue
from ..errors import ConfigurationError, SessionFlowError
from .tracing import wrap_tracers

if TYPE_CHECKING:
    from kombu.message import Message

    from ..flow import SessionFlow

logger = logging.getLogger("sessionflow.worker")


class SessionWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Adds this worker's session queue to the queues it consumes."""

    label = "sessionflow"

    def __init__(self, w: Any, max_sessions: int | None = None, **kwargs: Any) -> None:
        from ..flow import SessionFlow

        super().__init__(w, **kwargs)
        flow = SessionFlow.of(w.app)
        assert flow is not None
        cap = flow.config.max_concurrent_sessions if max_sessions is None else max_sessions
        if cap < 1:
            raise ConfigurationError(f"--max-sessions must be at least 1, got {cap}")
        queue = make_queue(flow.config.worker_queue(w.hostname))
        w.app.amqp.queues.select_add(queue)
        w.sessionflow = {"flow": flow, "cap": cap, "queue": queue.name}
        flow.worker_nodename = w.hostname  # pool processes forked later inherit it


class Admission(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumes the creation queue while below the cap; writes heartbeats."""

    label = "sessionflow admission"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.consumer: Consumer | None = None
        self.channel: Any = None
        self.paused = False
        self.timers: list[Any] = []
        self.started = False

    def start(self, c: Any) -> None:
        settings = c.controller.sessionflow
        self.flow: SessionFlow = settings["flow"]
        self.cap: int = settings["cap"]
        self.queue: str = settings["queue"]
        self.nodename: str = c.hostname
        wrap_tracers(self.flow, self.nodename)  # solo/threads pools run tasks in this process
        store = self.flow.store
        if not settings.get("registered"):
            # Once per process: the consumer restarts this step after a broker reconnect,
            # and that must not look like a new process taking over the node name.
            store.register_worker(self.nodename, self.queue, os.getpid(), self.cap)
            self.flow.lifecycle.worker_started(self.nodename)
            settings["registered"] = True
        self.channel = c.connection.channel()
        self.channel.basic_qos(0, 1, False)
        direct = make_queue(self.flow.config.worker_creation_queue(self.nodename))
        self.consumer = Consumer(
            self.channel,
            queues=[self.flow.creation_queue, direct],
            callbacks=[self.on_request],
            accept=["json"],
            prefetch_count=1,
        )
        self.paused = True
        self._maybe_resume()
        config = self.flow.config
        self.timers = [
            c.timer.call_repeatedly(config.admission_poll_interval, self._maybe_resume),
            c.timer.call_repeatedly(config.heartbeat_interval, self._heartbeat),
        ]
        self.started = True
        logger.info(
            "sessionflow: %s admits up to %d sessions; session queue %s",
            self.nodename,
            self.cap,
            self.queue,
        )

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

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if not self.started:
            return
        self.flow.lifecycle.worker_stopping(self.nodename)

    # -- admission ---------------------------------------------------------

    def on_request(self, body: Any, message: Message) -> None:
        session_id = body.get("session_id") if isinstance(body, dict) else None
        if not isinstance(session_id, str):
            logger.warning("sessionflow: dropping malformed creation request %r", body)
            message.ack()
            return
        if self.flow.worker_closing:  # shutting down: leave it for another worker
            message.requeue()
            self._pause()
            return
        try:
            outcome, open_count = self.flow.store.admit(
                session_id, self.nodename, self.queue, self.cap
            )
        except SessionFlowError:
            logger.exception("sessionflow: admission of %s failed; will retry", session_id)
            message.requeue()
            self._pause()
            return
        if outcome == "full":
            message.requeue()
            self._pause()
            return
        if outcome == "moved":
            self._adopt(session_id)
        message.ack()
        if outcome == "admitted":
            logger.info("sessionflow: admitted session %s", session_id)
        if open_count >= self.cap:
            self._pause()

    def _adopt(self, session_id: str) -> None:
        try:
            moved = self.flow.lifecycle.adopt(session_id, self.queue)
        except Exception:
            logger.exception("sessionflow: could not take over the tasks of %s", session_id)
            return
        logger.warning("sessionflow: took over session %s with %d queued tasks", session_id, moved)

    def _pause(self) -> None:
        if not self.paused and self.consumer is not None:
            # Set first: with RabbitMQ, cancel() waits for the broker and may deliver
            # another request into on_request, which must not cancel a second time.
            self.paused = True
            self.consumer.cancel()

    def _maybe_resume(self) -> None:
        if not self.paused or self.consumer is None or self.flow.worker_closing:
            return
        try:
            below_cap = self.flow.store.count_open(self.nodename) < self.cap
        except SessionFlowError:
            logger.exception("sessionflow: cannot count open sessions")
            return
        if below_cap:
            self.consumer.consume()
            self.paused = False

    # -- periodic ----------------------------------------------------------

    def _heartbeat(self) -> None:
        """Heartbeat, then end sessions whose time is up or whose worker is gone."""
        lifecycle = self.flow.lifecycle
        actions: tuple[Callable[[], None], ...] = (
            lambda: self.flow.store.heartbeat(self.nodename),
            lambda: lifecycle.expire(self.nodename),
            lifecycle.sweep,
        )
        for action in actions:
            try:
                action()
            except SessionFlowError as exc:
                logger.warning("sessionflow: %s", exc)
            except Exception:
                logger.exception("sessionflow: periodic check failed")

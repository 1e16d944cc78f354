"""The consumer bootstep that admits sessions: ``Admission`` takes creation requests
on the event loop while the worker is below its ``--max-sessions`` cap, and stops
consuming them (so another worker gets them) while it is at the cap.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from kombu.messaging import Consumer

from ..canvas import make_queue
from ..errors import SessionFlowError
from ..placement import Needs, placed
from ..queues import request_is_live
from ..records import NewSession
from .tracing import wrap_tracers

if TYPE_CHECKING:
    from kombu.message import Message

    from .steps import SessionWorker

logger = logging.getLogger("sessionflow.worker")


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

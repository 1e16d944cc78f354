"""Asking workers to admit a session: the request message, the wait for the admitting
worker's reply, and the cleanup after nobody answered. A base of
:class:`~sessionflow.flow.SessionFlow`, used for new sessions and for moves."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.entity import Queue

from .canvas import sending
from .enums import SessionStatus
from .placement import placed as is_placed
from .placer import Placer
from .queues import Queues, request_is_live
from .records import NewSession
from .store import SessionStore

logger = logging.getLogger("sessionflow")

_POLL_START, _POLL_MAX = 0.001, 0.05


class Admitting:
    """Admission requests: a base of :class:`~sessionflow.flow.SessionFlow`, which
    provides what is declared here."""

    app: Celery

    if TYPE_CHECKING:  # SessionFlow's parts, made on first use

        @property
        def store(self) -> SessionStore: ...
        @property
        def creation_queue(self) -> Queue: ...
        @property
        def queues(self) -> Queues: ...
        @property
        def placer(self) -> Placer: ...

    def request_admission(
        self,
        session_id: str,
        creation_timeout: float | None = None,
        queue: Queue | None = None,
        reply_id: str | None = None,
        move: bool = False,
        new: NewSession | None = None,
        on_open: dict[str, Any] | None = None,
        placed: dict[str, Any] | None = None,
    ) -> None:
        """Ask the workers (or the one of ``queue``) to admit a pending session.

        ``move``: it is a session changing workers, whose parked tasks come along.
        ``placed``: the request is addressed to one worker, which answers at once
        whether it fits (its requires and constraints); a new session that asks for
        placement without a queue is placed by :class:`~sessionflow.placer.Placer`
        in the background instead. Publishing retries as Celery's tasks do
        (``task_publish_retry_policy``), then raises :class:`BrokerError`.
        """
        if queue is None and placed is None and new is not None and is_placed(new):
            self.placer.submit(new, reply_id, on_open)
            return
        queue = queue or self.creation_queue
        body: dict[str, Any] = {"session_id": session_id}
        if move:
            body["move"] = True
        if new is not None:
            body["new"] = new.to_message()
        if on_open is not None:
            body["on_open"] = on_open
        if placed is not None:
            body["placed"] = placed
        if creation_timeout is not None:
            body["expires_at"] = time.time() + creation_timeout
        if reply_id is not None and not isinstance(self.app.backend, DisabledBackend):
            body["reply"] = reply_id
        with sending(self.app, "the session request"), self.app.producer_or_acquire() as producer:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                serializer="json",
                retry=True,
                retry_policy=self.app.conf.task_publish_retry_policy or {},
                expiration=creation_timeout,
            )

    def _await_admission(self, session_id: str, timeout: float, reply_id: str) -> bool:
        """Wait for the admitting worker's reply (result backend), else poll the store.

        True once a worker admitted the session; False when the time is up.
        """
        if not isinstance(self.app.backend, DisabledBackend):
            try:
                self.app.AsyncResult(reply_id).get(timeout=timeout, interval=0.01, propagate=False)
                return True
            except CeleryTimeout:
                return False
        deadline = time.monotonic() + timeout
        delay = _POLL_START
        while True:
            found = self.store.statuses([session_id]).get(session_id)
            if found is not None and found[0] is not SessionStatus.PENDING:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)

    def _clear_stale_requests(self, queue: Queue) -> None:
        """A timed-out client removes requests nobody waits for (Redis keeps them)."""
        try:
            self.queues.clear_stale_requests(queue, request_is_live)
        except Exception as exc:
            logger.warning("sessionflow: could not clear stale creation requests: %s", exc)

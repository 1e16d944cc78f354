"""Celery events of sessions, and the session id on the task events of session tasks.

With task events on (``celery worker -E``, or ``celery control enable_events``)
a worker sends, besides Celery's own events:

- ``session-opened``, ``session-closed``, ``session-failed``: fields ``session_id``,
  ``reason`` (None when opened), ``user_id``, ``agent_id``, ``open`` (sessions the
  worker has open after the change) and ``cap``; the event's ``hostname`` is the
  worker's node name. ``celery events --dump`` prints them; an ``EventReceiver``
  gets them with ``handlers={"session-closed": ...}`` or ``"*"``.
- a ``session_id`` field on every ``task-*`` event of a session task, which Flower
  shows on the task's page.

Session events go out from a thread of their own, over a connection of their own:
a slow broker never holds up admission, the ticker or the event loop. They are
best effort, as Celery's events are (a broker outage drops them, counted in the log).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from celery import Celery

from .canvas import SESSION_HEADER

logger = logging.getLogger("sessionflow.worker")

SESSION_OPENED = "session-opened"
SESSION_CLOSED = "session-closed"
SESSION_FAILED = "session-failed"
#: The field that task events of session tasks carry.
TASK_FIELD = "session_id"
_TERMINAL = frozenset({"task-succeeded", "task-failed", "task-rejected", "task-revoked"})
_REMEMBERED = 100_000  # task ids of session tasks whose events may still come
_BACKLOG = 10_000  # session events waiting to be sent; more are dropped
_STOP = object()


def task_events_on(dispatcher: Any) -> bool:
    """Whether ``dispatcher`` (a worker consumer's) sends task events (``-E``)."""
    if dispatcher is None or not dispatcher.enabled:
        return False
    groups = dispatcher.groups
    return not groups or "task" in groups


class SessionEvents:
    """Sends ``session-*`` events of one worker, from a thread of its own."""

    def __init__(self, app: Celery, hostname: str, enabled: Callable[[], bool]) -> None:
        self.app = app
        self.hostname = hostname
        self.enabled = enabled
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(_BACKLOG)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dispatcher: Any = None
        self._connection: Any = None
        self._quiet_until = 0.0

    def send(self, type_: str, **fields: Any) -> None:
        """Queue an event (if task events are on); never blocks."""
        if not self.enabled():
            return
        try:
            self._queue.put_nowait((type_, fields))
        except queue.Full:
            self._drop(f"{self._queue.qsize()} session events are waiting")
            return
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sessionflow-events", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._close()
                return
            type_, fields = item
            try:
                self._publish(type_, fields)
            except Exception as exc:
                self._close()
                self._drop(f"could not send {type_}: {exc!r}")

    def _publish(self, type_: str, fields: dict[str, Any]) -> None:
        if self._dispatcher is None:
            self._connection = self.app.connection_for_write()
            self._dispatcher = self.app.events.Dispatcher(
                self._connection, hostname=self.hostname, buffer_while_offline=False
            )
        self._dispatcher.send(type_, retry=True, retry_policy={"max_retries": 2}, **fields)

    def _close(self) -> None:
        dispatcher, connection = self._dispatcher, self._connection
        self._dispatcher = self._connection = None
        for thing in (dispatcher, connection):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing a broken connection
                    logger.debug("sessionflow: closing the event connection failed", exc_info=True)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if time.monotonic() >= self._quiet_until:  # one line a minute while it lasts
            logger.warning(
                "sessionflow: dropped a session event (%d so far): %s", self.dropped, why
            )
            self._quiet_until = time.monotonic() + 60

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (waiting up to ``timeout`` s), then close the connection."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)


class TaskEventTagger:
    """Adds ``session_id`` to the task events of session tasks.

    Celery sends ``task-received`` from the consumer's strategy, which captured the
    dispatcher's ``send`` when it was built; every event, buffered or not, leaves
    through the dispatcher's ``_publish``, so that is where the field is added.
    ``task_received`` (a Celery signal sent just before ``task-received``) tells it
    which task ids belong to which session.
    """

    def __init__(self, dispatcher_of: Callable[[], Any]) -> None:
        self.dispatcher_of = dispatcher_of
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def on_task_received(self, request: Any = None, **_: Any) -> None:
        """Celery's ``task_received`` signal (worker main process)."""
        if request is None or not task_events_on(self.dispatcher_of()):
            return
        session_id = request.request_dict.get(SESSION_HEADER)
        if isinstance(session_id, str):
            self.sessions[request.id] = session_id
            if len(self.sessions) > _REMEMBERED:
                self.sessions.popitem(last=False)

    def wrap(self, dispatcher: Any) -> bool:
        """Tag what ``dispatcher`` publishes (idempotent); False if it cannot be wrapped."""
        publish = getattr(dispatcher, "_publish", None)
        if publish is None:
            logger.warning(
                "sessionflow: this Celery's event dispatcher has no _publish; task events "
                "will not carry the session id"
            )
            return False
        if getattr(publish, "_sessionflow_tagged", False):
            return True

        def tagged(event: Any, *args: Any, **kwargs: Any) -> Any:
            self.tag(event)
            return publish(event, *args, **kwargs)

        tagged._sessionflow_tagged = True  # type: ignore[attr-defined]
        dispatcher._publish = tagged
        return True

    def tag(self, event: Any) -> None:
        """Add the field to one event or a list of them (a ``task.multi`` batch)."""
        if not self.sessions:
            return
        for one in event if isinstance(event, list) else (event,):
            if not isinstance(one, dict):
                continue
            type_ = one.get("type")
            if not isinstance(type_, str) or not type_.startswith("task-"):
                continue
            task_id = one.get("uuid")
            session_id = self.sessions.get(task_id) if isinstance(task_id, str) else None
            if session_id is not None:
                one[TASK_FIELD] = session_id
                if type_ in _TERMINAL:
                    self.sessions.pop(task_id, None)  # type: ignore[arg-type]


__all__ = [
    "SESSION_CLOSED",
    "SESSION_FAILED",
    "SESSION_OPENED",
    "TASK_FIELD",
    "SessionEvents",
    "TaskEventTagger",
    "task_events_on",
]

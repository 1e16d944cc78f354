"""Ending sessions: dead or stopped workers, timeouts, and the tasks left behind.

Liveness lives in SQL: workers write heartbeats from their main process, and
any process that sees a heartbeat older than a session's ``heartbeat_timeout``
— another worker, a client, the CLI — fails that session. Every task of an
ended session that had not finished gets a terminal result, so no ``.get()``
waits forever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import states
from celery.backends.base import DisabledBackend
from kombu.entity import Queue

from .canvas import SESSION_HEADER, make_queue
from .errors import SessionFlowError, SessionTaskLost
from .session import ended_error
from .store import CLOSED, FAILED, MOVING, OPEN, PENDING, Ended, utcnow

if TYPE_CHECKING:
    from .flow import SessionFlow

logger = logging.getLogger("sessionflow")
# A task registered this recently may still be on its way to the broker.
DISPATCH_GRACE = timedelta(seconds=1)


class Lifecycle:
    """Detects and ends sessions whose worker is gone or whose time is up."""

    def __init__(self, flow: SessionFlow) -> None:
        self.flow = flow
        self._healthy_since: float | None = None
        self._thread: threading.Thread | None = None
        self._thread_pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- results ------------------------------------------------------------

    def resolve(self, ended: Ended) -> None:
        """Store a terminal result for every task the ended session leaves unfinished."""
        self.store_failures(
            ended.cancelled, ended_error(ended.session_id, ended.status, ended.reason)
        )
        lost = SessionTaskLost(
            f"task was running on the worker of session {ended.session_id} when that worker "
            f"process died ({ended.reason}); it did not finish — run it again if it is safe",
            ended.session_id,
            ended.reason,
        )
        self.store_failures(ended.lost, lost)

    def store_failures(self, task_ids: Iterable[str], error: Exception) -> None:
        backend = self.flow.app.backend
        if isinstance(backend, DisabledBackend):
            return
        for task_id in task_ids:
            try:
                backend.store_result(task_id, error, states.FAILURE)
            except Exception:
                logger.exception("could not store %s for task %s", type(error).__name__, task_id)

    # -- dead and stopped workers -------------------------------------------

    def sweep(self) -> None:
        """Fail, keep or move the sessions of workers whose heartbeat stopped."""
        store = self.flow.store
        try:
            silent = store.silent_workers(min_age=2 * self.flow.config.heartbeat_interval)
        except SessionFlowError:
            self._healthy_since = None
            raise
        now = time.monotonic()
        if self._healthy_since is None:
            self._healthy_since = now
        healthy_for = now - self._healthy_since
        for nodename, age, status in silent:
            reason = "worker_shutdown" if status == "offline" else "worker_lost"
            moving: list[str] = []
            for row in store.open_sessions(nodename):
                # Judge only what this process watched for a whole timeout: after a
                # database outage every heartbeat looks old until workers write again.
                if age <= row["heartbeat_timeout"] or healthy_for < row["heartbeat_timeout"]:
                    continue
                if row["affinity"] == "soft":
                    ended = store.begin_move(row["id"], nodename)
                    if ended is not None:
                        moving.append(row["id"])
                else:
                    ended = store.end_session(
                        row["id"], FAILED, reason, hostname=nodename, lose_started=True
                    )
                if ended is not None:
                    logger.warning(
                        "sessionflow: session %s %s: %s (%s silent for %.1f s)",
                        row["id"],
                        "moves to another worker" if row["affinity"] == "soft" else "failed",
                        reason,
                        nodename,
                        age,
                    )
                    self.resolve(ended)
            if moving or not store.open_sessions(nodename):
                self.drain_queue(nodename, utcnow() - DISPATCH_GRACE)
            for session_id in moving:
                self.flow.request_admission(session_id)
        for session_id in store.stalled_moves():
            ended = store.end_session(session_id, FAILED, "worker_lost", from_states=(PENDING,))
            if ended is not None:
                logger.warning("sessionflow: no worker took over session %s", session_id)
                self.resolve(ended)
                self.drain_parked(session_id)

    def drain_queue(self, nodename: str, silent_since: datetime | None = None) -> None:
        """Empty a gone worker's session queue.

        Tasks of sessions that are moving are parked until their new worker takes
        them; tasks of sessions still waiting for a restart stay; the rest (their
        sessions have ended, their results are stored) are dropped. Tasks of a
        moving session that are nowhere (a transport that lost what the dead
        worker had prefetched) are resolved as lost.
        """
        store = self.flow.store
        statuses: dict[str | None, tuple[str | None, str | None]] = {}

        def destination(session_id: str | None) -> Queue | None:
            if session_id not in statuses:
                row = store.get_session(session_id) if session_id else None
                statuses[session_id] = (
                    (row["status"], row["reason"]) if row is not None else (None, None)
                )
            status, reason = statuses[session_id]
            if status == PENDING and reason == MOVING:
                assert session_id is not None
                return self.parking_queue(session_id)
            return make_queue(self.flow.config.worker_queue(nodename)) if status == OPEN else None

        try:
            seen = self.sort_queue(self.flow.config.worker_queue(nodename), destination)
        except Exception:
            logger.exception("sessionflow: could not drain the queue of %s", nodename)
            return
        for session_id, (status, reason) in statuses.items():
            if session_id and status == PENDING and reason == MOVING:
                self.resolve_missing(session_id, seen, silent_since)

    def sort_queue(self, name: str, destination: Callable[[str | None], Queue | None]) -> set[str]:
        """Move every message of queue ``name`` to ``destination(its session id)``.

        None drops the message. Returns the ids of all tasks the messages carry,
        including the later steps of chains and chord bodies they embed.
        """
        source = make_queue(name)
        seen: set[str] = set()
        with self.flow.app.connection_for_write() as conn:
            channel = conn.default_channel
            bound = source(channel)
            bound.declare()
            restore_unacked(channel, source.name)
            producer = conn.Producer()
            held = []
            for _ in range(bound.queue_declare(passive=True).message_count):
                message = bound.get(no_ack=False)
                if message is None:
                    break
                held.append(message)
            for message in held:  # in their original order
                seen |= _task_ids(message)
                target = destination((message.headers or {}).get(SESSION_HEADER))
                if target is not None:
                    _forward(producer, message, target)
                message.ack()
        return seen

    def resolve_missing(self, session_id: str, seen: set[str], before: datetime | None) -> None:
        """Tasks of an open session that were dispatched before ``before`` but are in
        no queue were lost with a worker's prefetched messages: resolve them."""
        if before is None:
            return
        ended = self.flow.store.lose_missing_tasks(session_id, seen, before)
        if ended is not None:
            logger.warning(
                "sessionflow: %d queued task(s) of %s were lost with their worker",
                len(ended.lost),
                session_id,
            )
            self.resolve(ended)

    def parking_queue(self, session_id: str) -> Queue:
        return make_queue(f"{self.flow.config.queue_prefix}.parked.{session_id}")

    def adopt(self, session_id: str, queue: str) -> int:
        """A worker took over a moved session: bring its parked tasks to ``queue``."""
        parked = self.parking_queue(session_id)
        target = make_queue(queue)
        moved = 0
        with self.flow.app.connection_for_write() as conn:
            bound = parked(conn.default_channel)
            bound.declare()
            producer = conn.Producer()
            while (message := bound.get(no_ack=False)) is not None:
                _forward(producer, message, target)
                message.ack()
                moved += 1
            bound.delete()
        return moved

    def drain_parked(self, session_id: str) -> None:
        try:
            with self.flow.app.connection_for_write() as conn:
                bound = self.parking_queue(session_id)(conn.default_channel)
                bound.declare()
                bound.purge()
                bound.delete()
        except Exception:
            logger.exception("sessionflow: could not drop parked tasks of %s", session_id)

    def worker_started(self, nodename: str) -> None:
        """A worker process starts as ``nodename``: settle what an earlier one left.

        Sessions that survive the restart keep their queued tasks (including the
        ones the earlier process had prefetched); tasks it was running are lost.
        """
        store = self.flow.store
        for ended in store.lose_started_tasks(nodename):
            self.resolve(ended)
        surviving = []
        for row in store.open_sessions(nodename):
            if row["survive_restart"]:
                surviving.append(row["id"])
                continue
            failed = store.end_session(
                row["id"], FAILED, "worker_lost", hostname=nodename, lose_started=True
            )
            if failed is not None:
                self.resolve(failed)
        if not surviving:
            return
        own = make_queue(self.flow.config.worker_queue(nodename))
        settled = utcnow() - DISPATCH_GRACE
        seen = self.sort_queue(own.name, lambda _session_id: own)
        for session_id in surviving:
            self.resolve_missing(session_id, seen, settled)

    def worker_stopping(self, nodename: str) -> None:
        """Warm shutdown: fail the worker's sessions; running tasks still finish."""
        try:
            self._end_for_shutdown(nodename)
        except SessionFlowError:
            logger.exception("sessionflow: could not end the sessions of %s", nodename)

    def _end_for_shutdown(self, nodename: str) -> None:
        store = self.flow.store
        for row in store.open_sessions(nodename):
            if row["survive_restart"]:
                continue  # failed later by a sweep unless the worker is back in time
            ended = store.end_session(row["id"], FAILED, "worker_shutdown", hostname=nodename)
            if ended is not None:
                self.resolve(ended)
        store.worker_offline(nodename)

    # -- time limits ----------------------------------------------------------

    def expire(self, nodename: str) -> None:
        """Close the worker's sessions past execution_timeout, ttl or idle_timeout."""
        store = self.flow.store
        now = utcnow()
        for row in store.open_sessions(nodename):
            reason = None
            if row["deadline_at"] is not None and row["deadline_at"] <= now:
                reason = "execution_timeout"
            elif row["expires_at"] is not None and row["expires_at"] <= now:
                reason = "ttl"
            elif row["idle_timeout"] is not None:
                since = store.idle_since(row["id"], row["last_activity_at"])
                if since is not None and (now - since).total_seconds() >= row["idle_timeout"]:
                    reason = "idle_timeout"
            if reason is None:
                continue
            ended = store.end_session(row["id"], CLOSED, reason, hostname=nodename)
            if ended is not None:
                logger.info("sessionflow: session %s closed: %s", row["id"], reason)
                self.resolve(ended)

    # -- the client-side watcher --------------------------------------------

    def ensure_watching(self) -> None:
        """Run :meth:`sweep` in a daemon thread of this (client) process."""
        if self.flow.worker_nodename is not None:
            return  # workers sweep from their event loop
        with self._lock:
            pid = os.getpid()
            if self._thread is not None and self._thread_pid == pid and self._thread.is_alive():
                return
            self._healthy_since = None
            self._thread = threading.Thread(
                target=self._watch, name="sessionflow-watch", daemon=True
            )
            self._thread_pid = pid
            self._thread.start()

    def _watch(self) -> None:
        interval = self.flow.config.monitor_interval
        quiet_until = 0.0
        while not self._stop.wait(interval):
            try:
                self.sweep()
                quiet_until = 0.0
            except Exception as exc:
                if time.monotonic() >= quiet_until:  # one line a minute while it lasts
                    logger.warning("sessionflow: liveness check failed: %s", exc)
                    quiet_until = time.monotonic() + 60

    def stop_watching(self) -> None:
        """Stop this process's watcher thread (``SessionFlow.close`` calls it)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._thread = None
        self._stop = threading.Event()


def restore_unacked(channel: Any, queue: str) -> int:
    """Put messages a dead consumer had prefetched from ``queue`` back into it.

    RabbitMQ does this when the connection drops. kombu's Redis transport keeps
    them aside until ``visibility_timeout`` (an hour by default); with one queue
    per worker, the ones routed to this queue belong to this worker alone.
    """
    qos = getattr(channel, "qos", None)
    client = getattr(channel, "client", None)
    if qos is None or client is None or not hasattr(qos, "restore_by_tag"):
        return 0
    restored = 0
    try:
        for tag in client.zrange(channel.unacked_index_key, 0, -1):
            payload = client.hget(channel.unacked_key, tag)
            if payload is None:
                continue
            _message, _exchange, routing_key = _loads(payload)
            if routing_key == queue:
                qos.restore_by_tag(tag, leftmost=True)
                restored += 1
    except Exception:
        logger.exception("sessionflow: could not restore prefetched messages of %s", queue)
    return restored


def _loads(payload: bytes | str) -> list[Any]:
    from kombu.utils.json import loads

    value: list[Any] = loads(payload)
    return value


def _forward(producer: Any, message: Any, queue: Queue) -> None:
    """Publish a received message, unchanged, to ``queue``."""
    props = message.properties or {}
    producer.publish(
        message.body,
        exchange="",
        routing_key=queue.name,
        declare=[queue],
        headers=message.headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        **{k: props[k] for k in ("correlation_id", "reply_to", "priority") if props.get(k)},
    )


def _task_ids(message: Any) -> set[str]:
    """Ids of the task in a Celery message and of every task its body embeds."""
    ids: set[str] = set()
    task_id = (message.headers or {}).get("id")
    if task_id:
        ids.add(task_id)
    try:
        body = message.decode()
    except Exception:  # not a format we can read: the message's own id must do
        return ids
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            options = item.get("options")
            if isinstance(options, dict) and isinstance(options.get("task_id"), str):
                ids.add(options["task_id"])
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return ids

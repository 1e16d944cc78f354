"""Broker-side work on session queues: draining a dead worker's queue, parking and
adopting the tasks of a moving session, and clearing stale creation requests.

All of it runs off the worker's event loop (the ticker thread or a client's
watcher thread), each call on a connection of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kombu.entity import Queue

from .canvas import SESSION_HEADER, make_queue
from .config import Config

logger = logging.getLogger("sessionflow")


class Queues:
    """Moves messages between the queues of one app's sessions."""

    def __init__(self, app: Any, config: Config) -> None:
        self.app = app
        self.config = config

    def parking_queue(self, session_id: str) -> Queue:
        return make_queue(f"{self.config.queue_prefix}.parked.{session_id}")

    def sort(self, name: str, destination: Callable[[str | None], Queue | None]) -> set[str]:
        """Move every message of queue ``name`` to ``destination(its session id)``.

        None drops the message. Returns the ids of all tasks the messages carry,
        including the later steps of chains and chord bodies they embed.
        """
        source = make_queue(name)
        seen: set[str] = set()
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            bound = source(channel)
            bound.declare()
            restore_unacked(channel, source.name)
            producer = conn.Producer()
            held = []
            # Not passive: on Redis a queue without messages does not exist (NOT_FOUND).
            for _ in range(bound.queue_declare().message_count):
                message = bound.get(no_ack=False)
                if message is None:
                    break
                held.append(message)
            for message in held:  # in their original order
                seen |= task_ids(message)
                target = destination((message.headers or {}).get(SESSION_HEADER))
                if target is not None:
                    forward(producer, message, target)
                message.ack()
        return seen

    def adopt(self, session_id: str, queue: str) -> int:
        """A worker took over a moved session: bring its parked tasks to ``queue``."""
        parked = self.parking_queue(session_id)
        target = make_queue(queue)
        moved = 0
        with self.app.connection_for_write() as conn:
            bound = parked(conn.default_channel)
            bound.declare()
            producer = conn.Producer()
            while (message := bound.get(no_ack=False)) is not None:
                forward(producer, message, target)
                message.ack()
                moved += 1
            bound.delete()
        return moved

    def drop_parked(self, session_id: str) -> None:
        try:
            with self.app.connection_for_write() as conn:
                bound = self.parking_queue(session_id)(conn.default_channel)
                bound.declare()
                bound.purge()
                bound.delete()
        except Exception:
            logger.exception("sessionflow: could not drop parked tasks of %s", session_id)

    def clear_stale_requests(self, queue: Queue, is_live: Callable[[dict[str, Any]], bool]) -> int:
        """Drop creation requests nobody waits for any more; keep (re-send) the others.

        kombu's Redis transport ignores message expiration, so a request whose
        client gave up would otherwise stay in the queue while every worker is full.
        Returns how many were dropped.
        """
        dropped = 0
        with self.app.connection_for_write() as conn:
            bound = queue(conn.default_channel)
            bound.declare()
            producer = conn.Producer()
            keep = []
            # Not passive: on Redis a queue without messages does not exist (NOT_FOUND).
            for _ in range(bound.queue_declare().message_count):
                message = bound.get(no_ack=False)
                if message is None:
                    break
                body = _decoded(message)
                if isinstance(body, dict) and is_live(body):
                    keep.append(body)
                else:
                    dropped += 1
                message.ack()
            for body in keep:
                producer.publish(
                    body,
                    exchange=queue.exchange,
                    routing_key=queue.routing_key,
                    declare=[queue],
                    serializer="json",
                )
        return dropped


def request_is_live(body: dict[str, Any], now: float | None = None) -> bool:
    """A creation request still has a waiting client (its ``expires_at`` is ahead)."""
    expires = body.get("expires_at")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        return True  # no deadline (a move): the sweeper decides about those
    return expires > (time.time() if now is None else now)


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


def _decoded(message: Any) -> Any:
    try:
        return message.decode()
    except Exception:
        return None


def forward(producer: Any, message: Any, queue: Queue) -> None:
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


def task_ids(message: Any) -> set[str]:
    """Ids of the task in a Celery message and of every task its body embeds."""
    ids: set[str] = set()
    task_id = (message.headers or {}).get("id")
    if task_id:
        ids.add(task_id)
    body = _decoded(message)
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

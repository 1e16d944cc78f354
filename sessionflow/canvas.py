"""Pin a task, signature or canvas to a session: stamp every signature in it.

``chain(...).apply_async(queue=q)`` routes only the first task, so the route is
set on every signature, including group members, chord headers and bodies.
Routing itself is done by :func:`route_session_task`, a Celery router that
reads the session headers, so nothing but JSON travels in the messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from celery import Signature
from celery.canvas import _chain, _chord, group, maybe_signature
from kombu.entity import Exchange, Queue

from .errors import InvalidArgument
from .runtime import current_run

SESSION_HEADER = "sessionflow_session"
QUEUE_HEADER = "sessionflow_queue"
_ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "exchange_type")


def build_signature(obj: Any, args: Any, kwargs: Any, options: Mapping[str, Any]) -> Signature:
    """Turn a task or signature plus call arguments into a fresh signature."""
    if not isinstance(args, (list, tuple)):
        raise InvalidArgument(f"args must be a list or tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidArgument(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    clashing = sorted(set(options) & set(_ROUTING_OPTIONS))
    if clashing:
        raise InvalidArgument(
            f"{', '.join(clashing)} cannot be set on a session task: every task of a "
            "session runs on the session's worker. Drop the option, or send the task "
            "outside the session."
        )
    if isinstance(obj, Signature):
        return obj.clone(tuple(args), dict(kwargs or {}), **options)
    if callable(getattr(obj, "signature", None)) and hasattr(obj, "name"):
        sig: Signature = obj.signature(tuple(args), dict(kwargs or {}), **options)
        return sig
    raise InvalidArgument(
        f"expected a Celery task, signature or canvas, got {type(obj).__name__}; "
        "pass e.g. my_task, my_task.s(1) or chain(a.s(), b.s())"
    )


def leaves(sig: Signature) -> Iterator[Signature]:
    """Every task signature in a (frozen) canvas, in dispatch order."""
    if isinstance(sig, _chain):
        frozen = getattr(sig, "_frozen", None)
        for step in reversed(frozen[0]) if frozen else sig.tasks:
            yield from leaves(step)
    elif isinstance(sig, (_chord, group)):
        for member in _members(sig):
            yield from leaves(member)
        body = getattr(sig, "body", None)
        if body is not None:
            yield from leaves(body)
    else:
        yield sig


def _members(sig: Signature) -> list[Signature]:
    header = sig.tasks
    if isinstance(header, Signature) and not isinstance(header, (group, _chain, _chord)):
        return [header]
    if isinstance(header, group):
        return list(header.tasks)
    return [maybe_signature(member, app=sig._app) for member in header]


def nodes(sig: Signature) -> Iterator[Signature]:
    """Every signature in a canvas, composite ones included."""
    yield sig
    if isinstance(sig, _chain):
        for step in sig.tasks:
            yield from nodes(step)
    elif isinstance(sig, (_chord, group)):
        if isinstance(sig.tasks, group):
            yield sig.tasks
        for member in _members(sig):
            yield from nodes(member)
        body = getattr(sig, "body", None)
        if body is not None:
            yield from nodes(body)


def stamp(sig: Signature, session_id: str, queue: str) -> None:
    """Set the session headers on every signature and clear competing routes.

    ``None`` routing options override routes that a task class declares
    (``@app.task(queue=...)``); the router then supplies the session queue.
    """
    for node in nodes(sig):
        headers = dict(node.options.get("headers") or {})
        headers[SESSION_HEADER] = session_id
        headers[QUEUE_HEADER] = queue
        node.options["headers"] = headers
        for key in _ROUTING_OPTIONS:
            node.options[key] = None


def route_session_task(
    name: str, args: Any, kwargs: Any, options: Mapping[str, Any], task: Any = None, **_: Any
) -> dict[str, Any] | None:
    """Celery router: send a message that carries session headers to its worker's queue."""
    headers = options.get("headers") or {}
    queue = headers.get(QUEUE_HEADER)
    if not queue:
        return None
    run = current_run()
    if run is not None and run.queue and run.session_id == headers.get(SESSION_HEADER):
        queue = run.queue  # sent from a task of the session: its queue may have moved
    return {"queue": Queue(queue, routing_key=queue), "exchange": "", "routing_key": queue}


def make_queue(name: str) -> Queue:
    """A durable direct queue bound under its own name (what Celery creates for ``-Q``)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)

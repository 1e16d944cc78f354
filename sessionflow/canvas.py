"""Pin a task, signature or canvas to a session: stamp every task signature in it.

``chain(...).apply_async(queue=q)`` routes only the first task, so the session
headers are set on every task signature of a canvas, including group members,
chord headers and bodies. Routing itself is done by :func:`route_session_task`,
a Celery router that reads the headers, so nothing but JSON travels.

Headers of a session task (all JSON):

- ``sessionflow_session``: the session id;
- ``sessionflow_queue``: the session's queue when it was sent;
- ``sessionflow_sig``: HMAC of (session id, task id), so a worker can tell a task
  sent through the session from a forged header without a lookup;
- ``sessionflow_branch``: ``[group id, member, step, member length]`` for the
  tasks of a parallel branch (see :mod:`sessionflow.branches`).

Composite signatures (chains, groups, chords) carry no ``headers`` option of
their own: Celery merges a group's options over its members', which would
replace each member's signature with the group's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from celery import Celery, Signature
from celery.canvas import _chain, _chord, group, maybe_signature
from kombu import compression
from kombu.entity import Exchange, Queue
from kombu.exceptions import EncodeError, OperationalError
from kombu.serialization import registry

from . import limits
from .config import mask_url
from .errors import BrokerError, InvalidArgument
from .runtime import current_run

SESSION_HEADER = "sessionflow_session"
QUEUE_HEADER = "sessionflow_queue"
SIG_HEADER = "sessionflow_sig"
BRANCH_HEADER = "sessionflow_branch"
HEADERS = (SESSION_HEADER, QUEUE_HEADER, SIG_HEADER, BRANCH_HEADER)
_ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "exchange_type")
_detached = threading.local()


#: Options that override a route a task class declares (``@app.task(queue=...)``).
NO_ROUTE: dict[str, Any] = {key: None for key in _ROUTING_OPTIONS}
_QUEUES: dict[str, Queue] = {}


def is_task(obj: Any) -> bool:
    """A registered Celery task (not a signature or canvas)."""
    return (
        not isinstance(obj, Signature)
        and callable(getattr(obj, "apply_async", None))
        and isinstance(getattr(obj, "name", None), str)
    )


def check_send(
    obj: Any, args: Any, kwargs: Any, complete_when_done: Any, options: dict[str, Any]
) -> None:
    """What ``apply_async`` refuses before anything is counted or sent."""
    if not isinstance(complete_when_done, bool):
        raise InvalidArgument("complete_when_done must be True or False")
    if "task_id" in options:
        limits.text("task_id", options["task_id"])
    check_sendable(obj)
    check_call(args, kwargs, options)
    if isinstance(obj, Signature):  # options set on it (a canvas's members: by Celery)
        check_options(obj.options)
        if any(isinstance(node, _chain) and not node.tasks for node in nodes(obj)):
            raise InvalidArgument(  # Celery's freeze fails on it with IndexError
                "an empty chain has no task to run: give every chain at least one "
                "signature, e.g. chain(a.s(), b.s()), or send nothing"
            )


def check_call(args: Any, kwargs: Any, options: Mapping[str, Any]) -> None:
    """Refuse call arguments and options a session task cannot take."""
    if not isinstance(args, (list, tuple)):
        raise InvalidArgument(f"args must be a list or tuple, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidArgument(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    bad_key = next((k for k in kwargs or () if not isinstance(k, str)), None)
    if bad_key is not None:
        raise InvalidArgument(f"kwargs keys must be strings, got {limits.shown(bad_key)}")
    clashing = sorted(set(options) & set(_ROUTING_OPTIONS))
    if clashing:
        raise InvalidArgument(
            f"{', '.join(clashing)} cannot be set on a session task: every task of a "
            "session runs on the session's worker. Drop the option, or send the task "
            "outside the session."
        )
    check_options(options)


def check_options(options: Mapping[str, Any]) -> None:
    """Celery's scheduling options, checked before anything is counted or sent (Celery
    itself fails on them only while publishing, with TypeError or ValueError)."""
    for name in ("countdown", "time_limit", "soft_time_limit"):
        value = options.get(name)
        if value is not None and not _seconds(value):
            raise InvalidArgument(
                f"{name} must be a number of seconds (at most 1e9), got {limits.shown(value)}"
            )
    for name in ("eta", "expires"):
        value = options.get(name)
        if value is None or isinstance(value, datetime) or (name == "expires" and _seconds(value)):
            continue
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            kinds = "a datetime, an ISO 8601 string" + (" or seconds" if name == "expires" else "")
            raise InvalidArgument(f"{name} must be {kinds}, got {limits.shown(value)}") from None
    priority = options.get("priority")
    if priority is not None and not (
        isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255
    ):
        raise InvalidArgument(f"priority must be an integer 0-255, got {limits.shown(priority)}")
    for name in ("headers", "retry_policy"):
        value = options.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise InvalidArgument(f"{name} must be a mapping, got {type(value).__name__}")
    serializer = options.get("serializer")
    if serializer is not None and not (
        isinstance(serializer, str) and (serializer == "raw" or serializer in registry.name_to_type)
    ):
        names = ", ".join(sorted(registry.name_to_type))
        raise InvalidArgument(f"serializer must be one of {names}, got {limits.shown(serializer)}")
    method = options.get("compression")
    if method is not None and not (isinstance(method, str) and _compression_known(method)):
        raise InvalidArgument(
            "compression must be a method kombu has installed (e.g. 'gzip', 'bzip2'), "
            f"got {limits.shown(method)}"
        )


def _compression_known(method: str) -> bool:
    try:
        compression.get_encoder(method)
    except KeyError:
        return False
    return True


def _seconds(value: Any) -> bool:
    return limits.finite(value) and abs(value) <= limits.MAX_SECONDS


def build_signature(obj: Any, args: Any, kwargs: Any, options: Mapping[str, Any]) -> Signature:
    """Turn a task or signature plus call arguments into a fresh signature."""
    check_call(args, kwargs, options)
    check_sendable(obj)
    return signature_of(obj, args, kwargs, options)


def signature_of(obj: Any, args: Any, kwargs: Any, options: Mapping[str, Any]) -> Signature:
    """:func:`build_signature` for what :func:`check_send` has checked already."""
    if isinstance(obj, Signature):
        return obj.clone(tuple(args), dict(kwargs or {}), **options)
    sig: Signature = obj.signature(tuple(args), dict(kwargs or {}), **options)
    return sig


@contextmanager
def sending(app: Celery, what: str) -> Iterator[None]:
    """kombu's errors while ``what`` is published, as sessionflow's: a body it cannot
    serialise is :class:`InvalidArgument`, a broker it cannot reach :class:`BrokerError`
    (naming the broker, its password masked). Nothing was sent in either case."""
    try:
        yield
    except EncodeError as exc:
        raise InvalidArgument(f"{what} cannot be serialised for the broker: {exc}") from exc
    except BROKER_DOWN as exc:
        raise broker_error(app, exc) from exc


BROKER_DOWN = (OperationalError, ConnectionError, TimeoutError)


def broker_error(app: Celery, exc: BaseException) -> BrokerError:
    """``exc`` (one of ``BROKER_DOWN``) as :class:`BrokerError`, naming the broker with
    its password masked, on one line."""
    with app.connection_for_write() as conn:
        url, password = conn.as_uri(include_password=True), conn.password
    detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if password:
        detail = detail.replace(password, "***")
    return BrokerError(
        f"cannot reach the broker at {mask_url(url)} ({detail}): is it running, and is "
        "broker_url right? Nothing was sent"
    )


def check_sendable(obj: Any) -> None:
    """Refuse what is neither a task nor a signature (a canvas is one)."""
    if isinstance(obj, Signature) or (
        callable(getattr(obj, "signature", None)) and hasattr(obj, "name")
    ):
        return
    raise InvalidArgument(
        f"expected a Celery task, signature or canvas, got {type(obj).__name__}; "
        "pass e.g. my_task, my_task.s(1) or chain(a.s(), b.s())"
    )


def _steps(sig: _chain) -> list[Signature]:
    """A chain's steps as it will send them (freezing may turn group|task into a chord)."""
    frozen = getattr(sig, "_frozen", None)
    return list(reversed(frozen[0])) if frozen else list(sig.tasks)


def _members(sig: Signature) -> list[Signature]:
    header = sig.tasks
    if isinstance(header, Signature) and not isinstance(header, (group, _chain, _chord)):
        return [header]
    if isinstance(header, group):
        return list(header.tasks)
    return [maybe_signature(member, app=sig._app) for member in header]


def leaves(sig: Signature) -> Iterator[Signature]:
    """Every task signature in a (frozen) canvas, in dispatch order."""
    if isinstance(sig, _chain):
        for step in _steps(sig):
            yield from leaves(step)
    elif isinstance(sig, (_chord, group)):
        for member in _members(sig):
            yield from leaves(member)
        body = getattr(sig, "body", None)
        if body is not None:
            yield from leaves(body)
    else:
        yield sig


def nodes(sig: Signature) -> Iterator[Signature]:
    """Every signature in a (frozen) canvas, composite ones included."""
    yield sig
    if isinstance(sig, _chain):
        for step in _steps(sig):
            yield from nodes(step)
    elif isinstance(sig, (_chord, group)):
        if isinstance(sig.tasks, group):
            yield sig.tasks
        for member in _members(sig):
            yield from nodes(member)
        body = getattr(sig, "body", None)
        if body is not None:
            yield from nodes(body)


def stamp(
    sig: Signature,
    session_id: str,
    queue: str,
    signer: Any,
    branches: Mapping[str, list[Any]] | None = None,
) -> None:
    """Set the session headers on every task signature and clear competing routes.

    ``signer(task_id)`` returns the signature header of a task. A composite's own
    ``headers`` move down to its tasks (Celery would let them replace the tasks'
    headers). ``None`` routing options override routes a task class declares
    (``@app.task(queue=...)``); the router then supplies the session queue.
    """
    inherited: dict[int, dict[str, Any]] = {}
    for node in nodes(sig):
        own = dict(inherited.get(id(node), {}))
        own.update(node.options.get("headers") or {})
        for key in _ROUTING_OPTIONS:
            node.options[key] = None
        if isinstance(node, (_chain, group, _chord)):
            node.options.pop("headers", None)
            for child in _children(node):
                inherited[id(child)] = {**own, **inherited.get(id(child), {})}
            continue
        own.update({SESSION_HEADER: session_id, QUEUE_HEADER: queue, SIG_HEADER: signer(node.id)})
        branch = (branches or {}).get(node.id)
        if branch is not None:
            own[BRANCH_HEADER] = branch
        node.options["headers"] = own


def _children(node: Signature) -> list[Signature]:
    if isinstance(node, _chain):
        return _steps(node)
    out = list(_members(node))
    if isinstance(node.tasks, group):
        out.append(node.tasks)
    body = getattr(node, "body", None)
    if body is not None:
        out.append(body)
    return out


# -- routing and sessions joined from inside a task ------------------------------------


@contextmanager
def detached() -> Iterator[None]:
    """Inside a session task: tasks sent in this block do not join the session.

    By default a task sent from a session task (``delay``, ``apply_async``,
    ``send_task``, a canvas) joins that session and runs on its worker.
    """
    previous = getattr(_detached, "on", False)
    _detached.on = True
    try:
        yield
    finally:
        _detached.on = previous


def is_detached() -> bool:
    return bool(getattr(_detached, "on", False))


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
    found = _QUEUES.get(queue)
    if found is None:
        found = _QUEUES[queue] = Queue(queue, routing_key=queue)
    return {"queue": found, "exchange": "", "routing_key": queue}


def make_queue(name: str) -> Queue:
    """A durable direct queue bound under its own name (what Celery creates for ``-Q``)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)

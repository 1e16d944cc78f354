"""Remote-control commands a worker answers.

Registered on import, which ``SessionFlow(app)`` does in every process that loads
the app module: ``celery inspect`` / ``celery control`` check command names in the
client's own process (celery #6608), so the CLI has to know them too.

- ``celery -A proj inspect sessions``: each worker's live view (cap, open sessions
  with age and task counts, whether admission is paused).
- ``celery -A proj control sessions_cap 8 -d w1@host``: change a worker's cap until
  it stops; the next creation request is judged by it. The reply names the old and
  the new value.
- ``celery -A proj control sessions_resources 'gpu=4,browser=8' -d w1@host`` and
  ``sessions_labels 'zone=eu'``: replace a worker's capacities or labels until it
  stops (``-`` clears them). Open sessions keep what they hold; the next creation
  request is judged by the new values, and the store has them within a heartbeat.
- ``sessionflow_end`` (internal): the owner of a session that ended in the store
  settles it at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
from celery.worker.control import control_command, inspect_command

from ..errors import ConfigurationError
from ..limits import MAX_CAP, MAX_SESSION_ID
from ..resources import spec_text, worker_labels, worker_resources


def _live(state: Any) -> Any:
    from ..flow import SessionFlow

    flow = SessionFlow.of(state.consumer.app)
    return None if flow is None else flow.live


def parse_cap(value: Any) -> int:
    """A cap as given on the command line or by a client: a whole number >= 1."""
    if isinstance(value, bool):
        raise click.BadParameter(f"cap must be a whole number from 1 to {MAX_CAP}, got {value!r}")
    try:
        cap = int(value)
    except (TypeError, ValueError):
        cap = 0
    if str(cap) != str(value).strip() or not 1 <= cap <= MAX_CAP:
        raise click.BadParameter(f"cap must be a whole number from 1 to {MAX_CAP}, got {value!r}")
    return cap


@control_command(  # type: ignore[untyped-decorator]
    args=[("session_id", str)],
    signature="<session_id>",
    help="sessionflow: settle a session that ended in the store (no task of it starts after)",
)
def sessionflow_end(state: Any, session_id: str) -> dict[str, Any]:
    """The owner of an ended session stops its tasks from starting and settles it."""
    live = _live(state)
    if live is None or not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID:
        return {"ok": False, "error": "this worker holds no such session"}
    held = live.get(session_id) is not None
    live.end(session_id)
    return {"ok": True, "held": held}


@inspect_command(  # type: ignore[untyped-decorator]
    help="sessionflow: this worker's open sessions, cap, and whether it takes new ones",
)
def sessions(state: Any) -> dict[str, Any]:
    """This worker's live view of its sessions."""
    live = _live(state)
    if live is None:
        return {"error": "this worker runs no sessionflow (SessionFlow(app) not attached)"}
    view: dict[str, Any] = live.describe()
    view["nodename"] = live.nodename
    step = getattr(_flow(state), "worker_step", None)
    view["task_limits"] = step.gate.limiter.describe() if step is not None else {}
    return view


def _flow(state: Any) -> Any:
    from ..flow import SessionFlow

    return SessionFlow.of(state.consumer.app)


def parse_resources(value: Any) -> dict[str, int]:
    """Capacities as the control command takes them: ``gpu=4,browser=8`` (``-``: none)."""
    try:
        return worker_resources(_spec(value), "the new value")
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_labels(value: Any) -> dict[str, str]:
    """Labels as the control command takes them: ``zone=eu,model=llama3`` (``-``: none)."""
    try:
        return worker_labels(_spec(value), "the new value")
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc)) from None


def _spec(value: Any) -> Any:
    if isinstance(value, Mapping):  # the celery CLI sends what these parsers made
        return value
    return "" if value is None or str(value).strip() in ("-", "") else str(value)


def _respec(state: Any, what: str, value: Any) -> dict[str, Any]:
    live = _live(state)
    if live is None:
        return {"error": "this worker runs no sessionflow (SessionFlow(app) not attached)"}
    try:
        new = parse_resources(value) if what == "resources" else parse_labels(value)
    except click.BadParameter as exc:
        return {"error": exc.message}
    old = dict(getattr(live, what))
    setattr(live, what, new)  # the next admission reads it: it runs on this event loop
    step = getattr(_flow(state), "worker_step", None)
    if step is not None:
        step.ticker.wake()  # the store has it with the next heartbeat, now
    used = spec_text(live.used())
    return {
        "ok": f"{what} {spec_text(old)} -> {spec_text(new)} (in use: {used})",
        "old": old,
        "new": new,
        "used": live.used(),
    }


@control_command(  # type: ignore[untyped-decorator]
    args=[("resources", parse_resources)],
    signature="<name=capacity,...>",
    help="sessionflow: replace the capacities this worker offers sessions (until it stops)",
)
def sessions_resources(state: Any, resources: Any) -> dict[str, Any]:
    """Replace this worker's capacities; open sessions keep what they hold."""
    return _respec(state, "resources", resources)


@control_command(  # type: ignore[untyped-decorator]
    args=[("labels", parse_labels)],
    signature="<label=value,...>",
    help="sessionflow: replace the labels sessions' constraints see here (until it stops)",
)
def sessions_labels(state: Any, labels: Any) -> dict[str, Any]:
    """Replace this worker's labels; open sessions stay where they are."""
    return _respec(state, "labels", labels)


@control_command(  # type: ignore[untyped-decorator]
    args=[("cap", parse_cap)],
    signature="<cap>",
    help="sessionflow: set the most sessions this worker opens at once (until it stops)",
)
def sessions_cap(state: Any, cap: Any) -> dict[str, Any]:
    """Change this worker's cap; effective for the next creation request."""
    live = _live(state)
    if live is None:
        return {"error": "this worker runs no sessionflow (SessionFlow(app) not attached)"}
    try:
        new = parse_cap(cap)
    except click.BadParameter as exc:
        return {"error": exc.message}
    old, live.cap = live.cap, new
    open_now = live.count()
    return {
        "ok": f"cap {old} -> {new} ({open_now} open)",
        "old": old,
        "new": new,
        "open": open_now,
    }

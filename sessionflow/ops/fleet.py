"""Workers as the operator sees them: each one's row in the store next to its live answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery

from .. import limits
from ..enums import WorkerStatus
from ..records import WorkerRecord
from .values import iso

if TYPE_CHECKING:
    from ..flow import SessionFlow


def worker_status(worker: WorkerRecord, heartbeat_interval: float) -> str:
    """``offline`` (shut down warmly), ``online``, or ``silent`` (no recent heartbeat)."""
    if worker.status is WorkerStatus.OFFLINE:
        return "offline"
    return "online" if worker.heartbeat_age <= 3 * heartbeat_interval + 1 else "silent"


def ask_workers(
    app: Celery, *, timeout: float, destination: Sequence[str] | None = None
) -> dict[str, Any]:
    """``inspect sessions`` of every worker that answers within ``timeout`` s."""
    replies = app.control.broadcast(
        "sessions", reply=True, timeout=timeout, destination=list(destination or []) or None
    )
    answers: dict[str, Any] = {}
    for reply in replies or ():
        if isinstance(reply, dict):
            answers.update(reply)
    return answers


def workers(
    flow: SessionFlow, *, timeout: float = 1.0, names: Sequence[str] = ()
) -> dict[str, Any]:
    """Every worker the store knows (or ``names``), its row next to its live answer."""
    timeout = limits.seconds("timeout", timeout) or 0.0
    rows = {w.nodename: w for w in flow.store.workers() if not names or w.nodename in names}
    answers = ask_workers(flow.app, timeout=timeout, destination=names)
    interval = flow.config.heartbeat_interval
    out = []
    for nodename in sorted(set(rows) | set(answers)):
        row, answer = rows.get(nodename), answers.get(nodename)
        live = None
        live_error = None
        if isinstance(answer, dict) and "error" not in answer:
            live = {
                "cap": answer.get("cap"),
                "open": answer.get("open"),
                "free": answer.get("free"),
                "admission_paused": answer.get("admission_paused"),
                "sessions": answer.get("sessions", {}),
                "resources": answer.get("resources", {}),
                "used": answer.get("used", {}),
                "labels": answer.get("labels", {}),
                "task_limits": answer.get("task_limits", {}),
            }
        elif answer is not None:
            live_error = str(answer.get("error") if isinstance(answer, dict) else answer)
        store = None
        if row is not None:
            store = {
                "status": worker_status(row, interval),
                "heartbeat_age": round(row.heartbeat_age, 3),
                "cap": row.max_sessions,
                "open": row.open_sessions,
                "free": max(row.max_sessions - row.open_sessions, 0),
                "pid": row.pid,
                "host": row.host,
                "queue": row.queue,
                "started_at": iso(row.started_at),
                "resources": dict(row.resources),
                "used": {name: row.usage.get(name, 0) for name in row.resources},
                "labels": dict(row.labels),
            }
        out.append(
            {
                "nodename": nodename,
                "store": store,
                "live": live,
                "live_error": live_error,
                "answered": answer is not None,
            }
        )
    return {"workers": out, "answered": sorted(answers), "timeout": timeout}

"""What the operator's commands do, as functions that return plain, JSON-ready dicts.

``celery -A proj sessions ...`` (:mod:`sessionflow.celery_cli`) calls these and
renders their result as a table, or as JSON with ``--json``; scripts can call them
too. None of them starts a thread or creates a store that does not exist yet.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.engine import make_url

from . import limits
from .config import DEFAULT_DATABASE_URL, Config, check_database_url, load_config
from .enums import SessionStatus, WorkerStatus
from .errors import ConfigurationError, InvalidArgument, SessionNotFound
from .records import SessionRecord, WorkerRecord, utcnow
from .retention import BATCH
from .retention import prune as retention_prune
from .state import SESSION, USER
from .store.sql import SQLStore

if TYPE_CHECKING:
    from .flow import SessionFlow

STATES = ("open", "closed", "failed")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


class StoreNotConfigured(ConfigurationError):
    """No session store was named, and using the default would create one."""


# -- values -----------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"`` -> seconds."""
    match = _DURATION.match(text or "")
    if match is None:
        raise InvalidArgument(
            f"not a duration: {text!r}; use a number with s, m, h, d or w, e.g. 90s, 15m, 7d"
        )
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _UNITS[unit]


def iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601 in UTC (None stays None)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def age(value: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds since ``value``."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return round(((now or utcnow()) - value).total_seconds(), 3)


def json_size(value: Any) -> int:
    """Bytes of a state value as stored (compact JSON, UTF-8)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


# -- which store -----------------------------------------------------------------------


def configured_url(app: Celery) -> str | None:
    """``sessionflow_database_url`` if the app sets it."""
    url = app.conf.get("sessionflow_database_url")
    return url if isinstance(url, str) and url else None


def default_store_hint() -> str:
    here = os.path.abspath(DEFAULT_DATABASE_URL.removeprefix("sqlite:///"))
    return f"the default store {DEFAULT_DATABASE_URL} (here {here})"


def store_config(app: Celery | None, url: str | None = None) -> Config:
    """The settings naming the store to act on: ``url``, else the app's configured one.

    Raises :class:`StoreNotConfigured` when neither names a store: the default
    (a SQLite file in the working directory) is never created implicitly.
    """
    if url:
        check_database_url(url)
        if app is None:
            return Config(database_url=url)
        return _with_url(load_config(app.conf), url)
    if app is None or configured_url(app) is None:
        which = (
            "No app was given" if app is None else f"The app {app.main or 'default'!r} sets none"
        )
        raise StoreNotConfigured(
            "which session store? Pass --url URL, or -A with an app that sets "
            f"sessionflow_database_url. {which}, and {default_store_hint()} is never "
            "created implicitly."
        )
    return load_config(app.conf)


def _with_url(config: Config, url: str) -> Config:
    from dataclasses import replace

    return replace(config, database_url=url)


def existing_store(config: Config) -> None:
    """Refuse a SQLite file that does not exist (reading must not create one)."""
    url = make_url(config.database_url)
    if url.get_backend_name() != "sqlite":
        return
    path = url.database or ""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    if not os.path.exists(path):
        raise ConfigurationError(
            f"no session store at {config.masked_url}: {os.path.abspath(path)} does not exist "
            "(is this the working directory the workers use?)"
        )


# -- db ----------------------------------------------------------------------------------


def db_current(config: Config) -> dict[str, Any]:
    """The schema revision in force (changes nothing; a missing SQLite file is refused)."""
    existing_store(config)
    store = SQLStore(config)
    try:
        return {"url": config.masked_url, "revision": store.revision()}
    finally:
        store.dispose()


def db_upgrade(config: Config) -> dict[str, Any]:
    """Apply pending migrations; returns the revision now in force."""
    store = SQLStore(config)
    try:
        return {"url": config.masked_url, "revision": store.upgrade()}
    finally:
        store.dispose()


# -- sessions ------------------------------------------------------------------------------


def session_dict(record: SessionRecord, now: datetime | None = None) -> dict[str, Any]:
    """What operators see of a session (no recreate token: it is a capability)."""
    state = "open" if record.moving else record.status.value
    return {
        "session_id": record.id,
        "state": state,
        "reason": None if record.moving else record.reason,
        "moving": record.moving,
        "hostname": record.hostname,
        "queue": record.queue,
        "user_id": record.user_id,
        "agent_id": record.agent_id,
        "metadata": dict(record.metadata or {}),
        "turns": record.turns,
        "max_turns": record.max_turns,
        "created_at": iso(record.created_at),
        "opened_at": iso(record.opened_at),
        "closed_at": iso(record.closed_at),
        "deadline_at": iso(record.deadline_at),
        "age": age(record.created_at, now),
        "last_heartbeat_at": iso(record.last_heartbeat_at),
        "heartbeat_age": age(record.last_heartbeat_at, now),
    }


def list_sessions(
    flow: SessionFlow,
    *,
    state: str | None = None,
    user_id: str | None = None,
    agent_id: str | None = None,
    hostname: str | None = None,
    older_than: float | None = None,
    newer_than: float | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """Sessions, newest first, at most ``limit``; ``more`` tells whether others match."""
    if state is not None and state not in STATES:
        raise InvalidArgument(f"state must be one of {', '.join(STATES)}, got {state!r}")
    for name, value in (("user_id", user_id), ("agent_id", agent_id), ("hostname", hostname)):
        limits.text(name, value, optional=True)
    limits.whole("limit", limit, minimum=1)
    now = utcnow()
    records = flow.store.list_sessions(
        status=SessionStatus(state) if state else None,
        user_id=user_id,
        agent_id=agent_id,
        hostname=hostname,
        created_before=None if older_than is None else now - timedelta(seconds=older_than),
        created_after=None if newer_than is None else now - timedelta(seconds=newer_than),
        limit=limit + 1,
        newest_first=True,
    )
    return {
        "sessions": [session_dict(r, now) for r in records[:limit]],
        "limit": limit,
        "more": len(records) > limit,
    }


def show_session(
    flow: SessionFlow, session_id: str, *, values: bool = False, history: int = 100
) -> dict[str, Any]:
    """A session with its tasks, its newest ``history`` runs and its state keys."""
    limits.text("session_id", session_id)
    store = flow.store
    record = store.get_session(session_id, with_heartbeat=True)
    if record is None or (record.status is SessionStatus.PENDING and not record.moving):
        raise SessionNotFound(f"no session {session_id!r} in the store")
    now = utcnow()
    tasks = [
        {
            "task_id": t.task_id,
            "name": t.name,
            "status": t.status.value,
            "worker": t.worker,
            "dispatched_at": iso(t.dispatched_at),
            "started_at": iso(t.started_at),
            "finished_at": iso(t.finished_at),
        }
        for t in store.tasks(session_id)
    ]
    runs = [
        {
            "task_id": r.task_id,
            "name": r.name,
            "state": r.state,
            "worker": r.worker,
            "started_at": iso(r.started_at),
            "finished_at": iso(r.finished_at),
            "runtime": round((r.finished_at - r.started_at).total_seconds(), 3),
            "error": r.error,
        }
        for r in store.history(session_id, history, flow.config.history_max_runs)
    ]
    scopes = [(SESSION, session_id)] + ([(USER, record.user_id)] if record.user_id else [])
    keys = []
    for scope, scope_id in scopes:
        for key, (value, version) in store.state_scope(scope, scope_id).items():
            entry: dict[str, Any] = {
                "key": key,
                "scope": scope,
                "size": json_size(value),
                "version": version,
            }
            if values:
                entry["value"] = value
            keys.append(entry)
    return {
        "session": session_dict(record, now),
        "tasks": tasks,
        "history": runs,
        "state": keys,
    }


def end_sessions(
    flow: SessionFlow, session_ids: Sequence[str], status: SessionStatus, reason: str
) -> list[dict[str, Any]]:
    """End each open session (its worker is told and settles it).

    ``outcome`` per id: ``ended``; ``already_ended`` (it had ended before: nothing
    changed); ``not_open`` (pending, not admitted yet); ``not_found``.
    """
    if status not in (SessionStatus.CLOSED, SessionStatus.FAILED):
        raise InvalidArgument(f"a session ends closed or failed, not {status.value}")
    limits.text("reason", reason)
    results = []
    for session_id in session_ids:
        limits.text("session_id", session_id)
        record = flow.store.get_session(session_id)
        outcome = "not_found"
        if record is not None and record.status is SessionStatus.OPEN:
            ended = flow.end_session(session_id, status, reason)
            record = flow.store.get_session(session_id) or record
            outcome = "ended" if ended else "already_ended"
        elif record is not None and record.status.ended:
            outcome = "already_ended"
        elif record is not None:
            outcome = "not_open"  # pending: not admitted yet, or moving to another worker
        results.append(
            {
                "session_id": session_id,
                "outcome": outcome,
                "state": None if record is None else record.status.value,
                "reason": None if record is None else record.reason,
                "hostname": None if record is None else record.hostname,
            }
        )
    return results


# -- workers -------------------------------------------------------------------------------


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
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
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


# -- retention -----------------------------------------------------------------------------


def prune(
    flow: SessionFlow, *, older_than: float | None = None, apply: bool = False
) -> dict[str, Any]:
    """What retention deletes: sessions ended more than ``older_than`` s ago (default:
    ``sessionflow_retention``), with their tasks, runs and state. ``apply`` deletes."""
    if older_than is None:
        older_than = flow.config.retention
        if older_than is None:
            raise InvalidArgument(
                "sessionflow_retention is None (ended sessions are kept for ever); "
                "pass --older-than to choose what to prune"
            )
    if not math.isfinite(older_than) or older_than < 0:
        raise InvalidArgument(f"older_than must be seconds >= 0, got {older_than!r}")
    cutoff = utcnow() - timedelta(seconds=older_than)
    if apply:
        counts = retention_prune(flow.store, older_than, flow.config.history_max_runs)
    else:
        counts = flow.store.prune(cutoff, batch=BATCH, dry_run=True)
    return {
        "deleted": apply,
        "older_than": older_than,
        "ended_before": iso(cutoff),
        "sessions": counts.sessions,
        "tasks": counts.tasks,
        "runs": counts.runs,
        "state_keys": counts.state_keys,
    }


__all__ = [
    "STATES",
    "StoreNotConfigured",
    "age",
    "db_current",
    "db_upgrade",
    "end_sessions",
    "existing_store",
    "iso",
    "list_sessions",
    "parse_duration",
    "prune",
    "session_dict",
    "show_session",
    "store_config",
    "workers",
]

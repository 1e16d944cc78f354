"""Sessions as the operator sees them: list, show, end."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .. import limits
from ..enums import SessionStatus
from ..errors import InvalidArgument, SessionNotFound
from ..records import SessionRecord, utcnow
from ..state import SESSION, USER
from .values import age, iso, json_size

if TYPE_CHECKING:
    from ..flow import SessionFlow

STATES = ("open", "closed", "failed")


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
        "requires": dict(record.requires or {}),
        "constraints": dict(record.constraints or {}),
        "prefer": list(record.prefer or []),
        "placement": record.placement,
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
    older_than = limits.seconds("older_than", older_than, optional=True, zero=True)
    newer_than = limits.seconds("newer_than", newer_than, optional=True, zero=True)
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
    changed, but its worker has applied that end when this returns); ``not_open``
    (pending, not admitted yet); ``not_found``.
    """
    status = limits.ending_status(status)
    limits.text("reason", reason, max_len=limits.MAX_REASON)
    for session_id in session_ids:  # every id checked before any session ends
        limits.text("session_id", session_id)
    results = []
    for session_id in session_ids:
        record = flow.store.get_session(session_id)
        outcome = "not_found"
        if record is not None and (record.status is SessionStatus.OPEN or record.status.ended):
            # An ended one too: its owner may not have applied the end yet (waited for).
            ended = flow.end_session(session_id, status, reason)
            record = flow.store.get_session(session_id) or record
            outcome = "ended" if ended else "already_ended"
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

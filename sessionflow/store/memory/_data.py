"""The in-memory store's data: the rows it keeps, the base class that holds them
behind one lock, and the conversions shared by its parts (copies as a JSON column
keeps them, records as the SQL store returns them, its refusal of naive datetimes).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from ...enums import Reason, SessionStatus, TaskStatus, WorkerStatus
from ...errors import StoreError
from ...merge import MISSING, copy_value
from ...records import NewSession, SessionRecord, utcnow

ENDED = (SessionStatus.CLOSED, SessionStatus.FAILED)
Op = tuple[str, str, Any]
ScopeKey = tuple[str, str]


@dataclass
class SessionRow:
    new: NewSession
    status: SessionStatus = SessionStatus.PENDING
    reason: str | None = None
    hostname: str | None = None
    queue: str | None = None
    turns: int = 0
    opened_at: datetime | None = None
    deadline_at: datetime | None = None
    expires_at: datetime | None = None
    closed_at: datetime | None = None
    last_activity_at: datetime | None = None
    settled_at: datetime | None = None

    @property
    def id(self) -> str:
        return self.new.id


@dataclass
class TaskRow:
    task_id: str
    session_id: str
    name: str | None
    dispatched_at: datetime
    state: str = TaskStatus.PENDING.value
    finished_at: datetime | None = None


@dataclass
class RunRow:
    id: int
    task_id: str
    attempt: int
    session_id: str
    name: str | None
    state: str
    worker: str | None
    started_at: datetime
    finished_at: datetime | None
    error: str | None


@dataclass
class WorkerRow:
    nodename: str
    host: str | None
    pid: int
    queue: str
    max_sessions: int
    status: WorkerStatus
    started_at: datetime
    last_heartbeat_at: datetime
    resources: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """A state row: a tombstone keeps its version (``deleted``)."""

    value: Any
    size: int
    version: int
    deleted: bool


@dataclass
class Group:
    session_id: str
    size: int
    snapshot_taken: bool
    snapshot: dict[str, Any]
    created_at: datetime
    finished: int = 0
    status: str = "open"
    conflict: list[str] | None = None
    merged_at: datetime | None = None
    steps: dict[tuple[int, int], tuple[str, list[Op] | None]] = field(default_factory=dict)


class MemoryBase:
    """The data every part of :class:`~sessionflow.store.memory.MemoryStore` works on.

    ``clock`` stamps everything (heartbeats, ends, leases); pass one to move time by hand.
    """

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._now = clock
        self._lock = threading.RLock()
        self._sessions: dict[str, SessionRow] = {}
        self._tasks: dict[str, TaskRow] = {}
        self._runs: dict[tuple[str, str, int], RunRow] = {}
        self._run_ids = 0
        self._workers: dict[str, WorkerRow] = {}
        self._leases: dict[str, tuple[str, datetime]] = {}
        self._state: dict[ScopeKey, dict[str, Entry]] = {}
        self._groups: dict[str, Group] = {}
        self._secret: bytes | None = None

    # -- helpers shared by the parts (called with the lock held) ------------------------

    def _session_values(self, session_id: str) -> dict[str, Any]:
        rows = self._state.get(("session", session_id), {})
        return {k: copy_value(e.value) for k, e in sorted(rows.items()) if not e.deleted}

    def _put(self, scope: str, scope_id: str, key: str, value: Any, size: int) -> None:
        rows = self._state.setdefault((scope, scope_id), {})
        row = rows.get(key)
        rows[key] = make_entry(value, size, 1 if row is None else row.version + 1)


def session_record(row: SessionRow, last_heartbeat_at: datetime | None = None) -> SessionRecord:
    new = row.new
    return SessionRecord(
        id=new.id,
        status=row.status,
        reason=row.reason,
        hostname=row.hostname,
        queue=row.queue,
        user_id=new.user_id,
        agent_id=new.agent_id,
        metadata=copy_value(new.metadata),
        creation_timeout=new.creation_timeout,
        execution_timeout=new.execution_timeout,
        heartbeat_timeout=new.heartbeat_timeout,
        ttl=new.ttl,
        idle_timeout=new.idle_timeout,
        max_turns=new.max_turns,
        turns=row.turns,
        survive_restart=new.survive_restart,
        affinity=new.affinity,
        merge_policy=new.merge_policy,
        reducers=copy_value(new.reducers),
        created_at=new.created_at,
        opened_at=row.opened_at,
        deadline_at=row.deadline_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
        recreated_from=new.recreated_from,
        target_worker=new.target_worker,
        settled=row.settled_at is not None or row.status not in ENDED,
        last_heartbeat_at=last_heartbeat_at,
        requires=copy_value(new.requires),
        constraints=copy_value(new.constraints),
        prefer=copy_value(new.prefer),
        placement=new.placement,
    )


def stored_copy(new: NewSession) -> NewSession:
    """A private copy of a new session's JSON values, as a database keeps them."""
    return replace(
        new,
        metadata=json_copy(new.metadata),
        reducers=json_copy(new.reducers),
        requires=json_copy(new.requires),
        constraints=json_copy(new.constraints),
        prefer=json_copy(new.prefer),
    )


def is_moving(row: SessionRow) -> bool:
    return row.status is SessionStatus.PENDING and row.reason == Reason.MOVING.value


def json_copy(value: Any) -> Any:
    """A copy of a JSON value; what a JSON column refuses is a StoreError here too."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"session store write failed: {type(exc).__name__}") from None


def make_entry(value: Any, size: int, version: int) -> Entry:
    if value is MISSING:
        return Entry(None, 0, version, True)
    return Entry(json_copy(value), size, version, False)


def copy_ops(ops: Iterable[Op]) -> list[Op]:
    return [(kind, key, json_copy(arg)) for kind, key, arg in ops]

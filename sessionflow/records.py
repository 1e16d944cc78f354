"""What the store takes and gives back: frozen dataclasses, no SQL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

from .enums import Reason, SessionStatus, TaskStatus, WorkerStatus
from .errors import StoreRefused
from .placement import Needs, placed


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def storable(text: str | None) -> str | None:
    """Text a task produced (its exception message), made storable on every database:
    NUL (PostgreSQL text refuses it) and lone surrogates (no encoding) become U+FFFD."""
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def check_utc(value: datetime) -> None:
    """Refuse naive datetimes, as the SQL store's column type does."""
    if value.tzinfo is None:
        raise StoreRefused("session store refused a naive datetime: pass timezone-aware UTC times")


def runs_to_write(batch: Sequence[Run]) -> list[Run]:
    """What a store writes of a batch of runs: one per (session, task, attempt), the end
    winning over the start of the same run, with text made :func:`storable`."""
    merged: dict[tuple[str, str, int], Run] = {}
    for run in batch:
        key = (run.session_id, run.task_id, run.attempt)
        earlier = merged.get(key)
        if earlier is None or earlier.finished_at is None:
            merged[key] = run
    return [_storable_run(run) for run in merged.values()]


def _storable_run(run: Run) -> Run:
    name, worker, error = storable(run.name), storable(run.worker), storable(run.error)
    if name is run.name and worker is run.worker and error is run.error:
        return run
    return replace(run, name=name, worker=worker, error=error)


@dataclass(frozen=True)
class NewSession:
    """A session to create as pending: its id and validated options."""

    id: str
    created_at: datetime
    creation_timeout: float
    execution_timeout: float
    heartbeat_timeout: float = 10.0
    user_id: str | None = None
    agent_id: str | None = None
    metadata: dict[str, Any] | None = None
    ttl: float | None = None
    idle_timeout: float | None = None
    max_turns: int | None = None
    survive_restart: bool = False
    affinity: str = "hard"
    merge_policy: str = "last_write_wins"
    reducers: dict[str, str] | None = None
    target_worker: str | None = None
    recreated_from: str | None = None
    # Placement (canonical, see sessionflow.resources); None: not asked for.
    requires: dict[str, int] | None = None
    constraints: dict[str, list[Any]] | None = None
    prefer: list[list[Any]] | None = None
    placement: str | None = None

    def to_message(self) -> dict[str, Any]:
        """JSON for a creation request: the admitting worker inserts the row itself."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["created_at"] = self.created_at.isoformat()
        return body

    @classmethod
    def from_message(cls, body: Any) -> NewSession:
        """The session a creation request carries; ValueError if it is not one."""
        if not isinstance(body, dict) or set(body) - {f.name for f in fields(cls)}:
            raise ValueError("not a session specification")
        values = dict(body)
        created = datetime.fromisoformat(str(values.pop("created_at")))
        if created.tzinfo is None:
            raise ValueError("created_at has no time zone")
        new = cls(created_at=created, **values)
        for name, kinds in _SPEC_TYPES.items():
            value = getattr(new, name)
            if not isinstance(value, kinds) or isinstance(value, bool) != (kinds == (bool,)):
                raise ValueError(f"{name} has the wrong type")
        if placed(new):
            Needs.checked(new)  # InvalidArgument (a ValueError) if the sender made it up
        return new


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "creation_timeout": (int, float),
    "execution_timeout": (int, float),
    "heartbeat_timeout": (int, float),
    "survive_restart": (bool,),
    "affinity": (str,),
    "merge_policy": (str,),
}


@dataclass(frozen=True)
class SessionRecord:
    """A session as the store knows it."""

    id: str
    status: SessionStatus
    reason: str | None
    hostname: str | None
    queue: str | None
    user_id: str | None
    agent_id: str | None
    metadata: dict[str, Any] | None
    creation_timeout: float
    execution_timeout: float
    heartbeat_timeout: float
    ttl: float | None
    idle_timeout: float | None
    max_turns: int | None
    turns: int
    survive_restart: bool
    affinity: str
    merge_policy: str
    reducers: dict[str, str] | None
    created_at: datetime
    opened_at: datetime | None
    deadline_at: datetime | None
    expires_at: datetime | None
    closed_at: datetime | None
    recreated_from: str | None
    target_worker: str | None
    settled: bool
    last_heartbeat_at: datetime | None = None  # of its worker, when asked for
    requires: dict[str, int] | None = None
    constraints: dict[str, list[Any]] | None = None
    prefer: list[list[Any]] | None = None
    placement: str | None = None

    @property
    def moving(self) -> bool:
        """Pending because it is changing workers (soft affinity), not new."""
        return self.status is SessionStatus.PENDING and self.reason == Reason.MOVING


@dataclass(frozen=True)
class WorkerRecord:
    """A ``celery worker`` process that runs sessions, by node name."""

    nodename: str
    host: str | None
    pid: int
    queue: str
    max_sessions: int
    status: WorkerStatus
    started_at: datetime
    last_heartbeat_at: datetime
    heartbeat_age: float  # seconds, on the store's clock
    open_sessions: int
    resources: dict[str, int] = field(default_factory=dict)  # declared capacities
    labels: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)  # sum of ``requires`` of open sessions


@dataclass(frozen=True)
class GroupSpec:
    """A group or chord header sent through a session: its members are branches."""

    id: str
    size: int  # tasks in all members together
    snapshot_now: bool  # sent at once (snapshot at dispatch) or later (at its first start)


@dataclass(frozen=True)
class Dispatch:
    """Tasks about to be sent through a session: registered in one statement."""

    session_id: str
    tasks: tuple[tuple[str, str | None], ...]  # (task id, task name)
    groups: tuple[GroupSpec, ...] = ()
    at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Run:
    """One execution of a session task, as the worker's writer records it.

    ``finished_at`` is None while it runs; ``state`` is a Celery state, or
    ``STARTED`` while it runs, or ``LOST``.
    """

    task_id: str
    attempt: int  # Celery's retries count: a retry is a new run, a redelivery the same
    session_id: str
    name: str | None
    state: str
    worker: str | None
    started_at: datetime
    finished_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """One finished execution of a session task, as ``Session.history()`` reports it."""

    task_id: str
    name: str | None
    state: str  # Celery state: SUCCESS, FAILURE, RETRY, ... or LOST
    worker: str | None
    started_at: datetime
    finished_at: datetime
    error: str | None


@dataclass(frozen=True)
class TaskRecord:
    """A task of a session and what became of it."""

    task_id: str
    name: str | None
    status: TaskStatus
    worker: str | None
    dispatched_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Ended:
    """A session that was just ended, and what became of its unfinished tasks."""

    session_id: str
    status: SessionStatus
    reason: str
    cancelled: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneCounts:
    """What a retention pass deleted (or would delete)."""

    sessions: int = 0
    tasks: int = 0
    runs: int = 0
    state_keys: int = 0

    def __add__(self, other: PruneCounts) -> PruneCounts:
        return PruneCounts(
            self.sessions + other.sessions,
            self.tasks + other.tasks,
            self.runs + other.runs,
            self.state_keys + other.state_keys,
        )


#: ``merger(live, snapshot, member_logs, policy, reducers) -> {key: value or MISSING}``;
#: raises a SessionFlowError (conflict, unknown reducer) to refuse the merge.
Merger = Callable[
    [
        dict[str, Any],
        dict[str, Any],
        list[list[tuple[str, str, Any]]],
        str,
        "dict[str, str] | None",
    ],
    dict[str, Any],
]


@dataclass(frozen=True)
class StateWrite:
    """One key to set (``value``) or delete (``value`` is ``MISSING``).

    ``expected`` is the version the writer read (compare-and-set; 0: the key must
    not exist), or None to write blindly.
    """

    scope: str
    scope_id: str
    key: str
    value: Any
    size: int
    expected: int | None = None


@dataclass(frozen=True)
class BranchStart:
    """What a branch task starts from: the group's snapshot and its member's earlier ops."""

    snapshot: dict[str, Any]
    earlier: list[tuple[str, str, Any]]

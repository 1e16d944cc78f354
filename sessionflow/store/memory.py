"""An in-memory :class:`~sessionflow.store.base.SessionStore` for tests: the SQL store's
semantics (return values, errors, conditional transitions) behind one lock.

Every method takes the lock for its whole run, as a SQL transaction would: a
conditional transition (pending → open, open → closed) decides a race here too.
Time comes from ``clock`` (default :func:`~sessionflow.records.utcnow`), so a test
can move it forward to expire leases or age heartbeats.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from ..enums import RUN_FINAL_STATES, RUN_LOST, Reason, SessionStatus, TaskStatus, WorkerStatus
from ..errors import (
    NodeNameInUse,
    SessionNotFound,
    StateConflict,
    StateValueError,
    StoreError,
    ended_error,
)
from ..merge import MISSING, apply_op, check_value, copy_value
from ..records import (
    Dispatch,
    Ended,
    NewSession,
    PruneCounts,
    Run,
    RunRecord,
    SessionRecord,
    TaskRecord,
    WorkerRecord,
    utcnow,
)
from .base import BranchStart, Merger, SessionStore, StateWrite
from .sql.migrate import head_revision
from .sql.tasks import task_status

_ENDED = (SessionStatus.CLOSED, SessionStatus.FAILED)
_WRITABLE = (SessionStatus.OPEN, SessionStatus.PENDING)
_NO_LIMIT = 2**62
_LOST_ERROR = "the worker process died"
Op = tuple[str, str, Any]
ScopeKey = tuple[str, str]


@dataclass
class _Session:
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
class _Task:
    task_id: str
    session_id: str
    name: str | None
    dispatched_at: datetime
    state: str = TaskStatus.PENDING.value
    finished_at: datetime | None = None


@dataclass
class _Run:
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
class _Worker:
    nodename: str
    host: str | None
    pid: int
    queue: str
    max_sessions: int
    status: WorkerStatus
    started_at: datetime
    last_heartbeat_at: datetime


@dataclass(frozen=True)
class _Entry:
    """A state row: a tombstone keeps its version (``deleted``)."""

    value: Any
    size: int
    version: int
    deleted: bool


@dataclass
class _Group:
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


class MemoryStore(SessionStore):
    """:class:`~sessionflow.store.base.SessionStore` in this process's memory.

    ``clock`` stamps everything (heartbeats, ends, leases); pass one to move time by hand.
    """

    dialect = "memory"

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._now = clock
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._tasks: dict[str, _Task] = {}
        self._runs: dict[tuple[str, str, int], _Run] = {}
        self._run_ids = 0
        self._workers: dict[str, _Worker] = {}
        self._leases: dict[str, tuple[str, datetime]] = {}
        self._state: dict[ScopeKey, dict[str, _Entry]] = {}
        self._groups: dict[str, _Group] = {}
        self._secret: bytes | None = None

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._sessions)} sessions>"

    # -- schema and process ------------------------------------------------------------

    def upgrade(self) -> str:
        return head_revision()

    def revision(self) -> str | None:
        return self.upgrade()

    def secret(self) -> bytes:
        with self._lock:
            if self._secret is None:
                self._secret = secrets.token_bytes(32)
            return self._secret

    def dispose(self) -> None:
        """Nothing to close: the data stays."""

    # -- sessions ----------------------------------------------------------------------

    def create_pending(self, new: NewSession) -> None:
        _utc(new.created_at)
        with self._lock:
            if new.id in self._sessions:
                raise StoreError(f"session store write refused: session {new.id!r} exists")
            stored = replace(new, metadata=_json(new.metadata), reducers=_json(new.reducers))
            self._sessions[new.id] = _Session(stored)

    def get_session(self, session_id: str, *, with_heartbeat: bool = False) -> SessionRecord | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None:
                return None
            beat = None
            if with_heartbeat and row.hostname is not None:
                worker = self._workers.get(row.hostname)
                beat = None if worker is None else worker.last_heartbeat_at
            return _record(row, beat)

    def list_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        hostname: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[SessionRecord]:
        for bound in (created_after, created_before):
            if bound is not None:
                _utc(bound)
        with self._lock:
            found = []
            for row in self._sessions.values():
                moving = _moving(row)
                if row.status is SessionStatus.PENDING and not moving:
                    continue
                if status is SessionStatus.OPEN:
                    if row.status is not SessionStatus.OPEN and not moving:
                        continue
                elif status is not None and row.status is not status:
                    continue
                new = row.new
                if any(
                    wanted is not None and have != wanted
                    for have, wanted in (
                        (new.user_id, user_id),
                        (new.agent_id, agent_id),
                        (row.hostname, hostname),
                    )
                ):
                    continue
                if created_after is not None and new.created_at < created_after:
                    continue
                if created_before is not None and new.created_at >= created_before:
                    continue
                found.append(row)
            found.sort(key=lambda r: (r.new.created_at, r.id), reverse=newest_first)
            if limit is not None:
                found = found[:limit]
            return [_record(row) for row in found]

    def statuses(self, session_ids: Collection[str]) -> dict[str, tuple[SessionStatus, str | None]]:
        with self._lock:
            return {
                sid: (row.status, row.reason)
                for sid in sorted(set(session_ids))
                if (row := self._sessions.get(sid)) is not None
            }

    def open_new(self, new: NewSession, nodename: str, queue: str) -> SessionRecord | None:
        _utc(new.created_at)
        with self._lock:
            if new.id in self._sessions:
                return None
            stored = replace(new, metadata=_json(new.metadata), reducers=_json(new.reducers))
            row = self._sessions[new.id] = _Session(stored)
            now = self._now()
            row.opened_at = now
            row.deadline_at = now + timedelta(seconds=new.execution_timeout)
            ttl = new.ttl
            row.expires_at = None if ttl is None else new.created_at + timedelta(seconds=ttl)
            row.status, row.reason = SessionStatus.OPEN, None
            row.hostname, row.queue, row.last_activity_at = nodename, queue, now
            return _record(row)

    def abandon_new(self, new: NewSession, reason: str) -> bool:
        _utc(new.created_at)
        with self._lock:
            if new.id in self._sessions:
                return False
            stored = replace(new, metadata=_json(new.metadata), reducers=_json(new.reducers))
            row = self._sessions[new.id] = _Session(stored)
            row.status, row.reason = SessionStatus.FAILED, reason
            row.closed_at = row.settled_at = self._now()
            return True

    def abandon_pending(self, session_id: str, reason: str) -> bool:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status is not SessionStatus.PENDING or _moving(row):
                return False
            row.status, row.reason = SessionStatus.FAILED, reason
            row.closed_at = row.settled_at = self._now()  # nothing of it ever ran
            return True

    def admit(self, session_id: str, nodename: str, queue: str) -> SessionRecord | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status is not SessionStatus.PENDING:
                return None
            if row.new.target_worker not in (None, nodename):
                return None
            now = self._now()
            if not _moving(row):  # a moved session keeps its clocks
                new = row.new
                row.opened_at = now
                row.deadline_at = now + timedelta(seconds=new.execution_timeout)
                row.expires_at = (
                    None if new.ttl is None else new.created_at + timedelta(seconds=new.ttl)
                )
            row.status, row.reason = SessionStatus.OPEN, None
            row.hostname, row.queue, row.last_activity_at = nodename, queue, now
            return _record(row)

    def dispatch(self, dispatch: Dispatch) -> str | None:
        _utc(dispatch.at)
        with self._lock:
            row = self._sessions.get(dispatch.session_id)
            n = len(dispatch.tasks)
            if row is None or row.status is not SessionStatus.OPEN:
                return None
            if row.new.max_turns is not None and row.turns + n > row.new.max_turns:
                return None
            group_ids = [g.id for g in dispatch.groups]
            if len(set(group_ids)) != len(group_ids) or any(g in self._groups for g in group_ids):
                raise StoreError("session store write refused: a branch group id exists")
            row.turns += n
            for task_id, name in dispatch.tasks:
                if task_id not in self._tasks:
                    self._tasks[task_id] = _Task(task_id, row.id, name, dispatch.at)
            for spec in dispatch.groups:
                snapshot = self._session_values(row.id) if spec.snapshot_now else {}
                self._groups[spec.id] = _Group(
                    row.id, spec.size, spec.snapshot_now, snapshot, dispatch.at
                )
            return row.queue

    def undo_dispatch(self, dispatch: Dispatch) -> None:
        with self._lock:
            row = self._sessions.get(dispatch.session_id)
            if row is not None:
                row.turns -= len(dispatch.tasks)
            for task_id, _ in dispatch.tasks:
                task = self._tasks.get(task_id)
                if task is not None and task.session_id == dispatch.session_id:
                    del self._tasks[task_id]
            for spec in dispatch.groups:
                self._groups.pop(spec.id, None)

    def end_session(
        self,
        session_id: str,
        status: SessionStatus,
        reason: str,
        *,
        from_states: Collection[SessionStatus] = (SessionStatus.OPEN,),
        hostname: str | None = None,
    ) -> bool:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status not in from_states:
                return False
            if hostname is not None and row.hostname != hostname:
                return False
            row.status, row.reason = SessionStatus(status), reason
            row.closed_at, row.settled_at = self._now(), None
            return True

    def settle(
        self, session_id: str, *, running: Collection[str] = (), lose_started: bool = False
    ) -> Ended | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status not in _ENDED or row.settled_at is not None:
                return None
            now = self._now()
            row.settled_at = now
            started = set(running)
            cancelled, lost = [], []
            for task in self._unsettled_tasks(session_id):
                if task.task_id in started or self._in_progress(task.task_id):
                    if lose_started:
                        lost.append(task.task_id)
                else:
                    cancelled.append(task.task_id)
            self._settle_tasks(cancelled, TaskStatus.CANCELLED, now)
            self._settle_tasks(lost, TaskStatus.LOST, now)
            self._close_runs(lost, now)
            return Ended(session_id, row.status, row.reason or "", tuple(cancelled), tuple(lost))

    def unsettled(self, hostname: str | None = None) -> list[tuple[str, str | None]]:
        with self._lock:
            return [
                (row.id, row.hostname)
                for row in self._sessions.values()
                if row.status in _ENDED
                and row.settled_at is None
                and (hostname is None or row.hostname == hostname)
            ]

    def begin_move(self, session_id: str, hostname: str) -> Ended | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status is not SessionStatus.OPEN or row.hostname != hostname:
                return None
            now = self._now()
            row.status, row.reason = SessionStatus.PENDING, Reason.MOVING.value
            row.hostname = row.queue = None
            row.last_activity_at = now
            lost = [
                t.task_id for t in self._unsettled_tasks(session_id) if self._in_progress(t.task_id)
            ]
            self._settle_tasks(lost, TaskStatus.LOST, now)
            self._close_runs(lost, now)
            return Ended(
                session_id, SessionStatus.FAILED, Reason.WORKER_LOST.value, (), tuple(lost)
            )

    def stalled_moves(self) -> list[str]:
        with self._lock:
            now = self._now()
            return [
                row.id
                for row in self._sessions.values()
                if _moving(row)
                and row.last_activity_at is not None
                and row.last_activity_at + timedelta(seconds=row.new.creation_timeout) <= now
            ]

    def open_sessions(self, nodename: str) -> list[SessionRecord]:
        with self._lock:
            return [
                _record(row)
                for row in self._sessions.values()
                if row.hostname == nodename and row.status is SessionStatus.OPEN
            ]

    # -- tasks and runs ----------------------------------------------------------------

    def record_runs(self, runs: Sequence[Run]) -> None:
        if not runs:
            return
        for run in runs:
            _utc(run.started_at)
            if run.finished_at is not None:
                _utc(run.finished_at)
        with self._lock:
            merged = _merged(runs)
            unknown = sorted({r.session_id for r in merged} - set(self._sessions))
            if unknown:
                raise StoreError(f"session store write refused: no session {unknown[0]!r}")
            for run in merged:
                key = (run.session_id, run.task_id, run.attempt)
                old = self._runs.get(key)
                if old is None:
                    self._run_ids += 1
                    self._runs[key] = _Run(
                        self._run_ids,
                        run.task_id,
                        run.attempt,
                        run.session_id,
                        run.name,
                        run.state,
                        run.worker,
                        run.started_at,
                        run.finished_at,
                        run.error,
                    )
                    continue
                # A run's end never goes back to "running": a late start record keeps it.
                if old.finished_at is None:
                    old.state, old.finished_at, old.error = run.state, run.finished_at, run.error
                old.worker = run.worker if run.worker is not None else old.worker
                old.name = run.name if run.name is not None else old.name

    def tasks(self, session_id: str) -> list[TaskRecord]:
        with self._lock:
            latest: dict[str, _Run] = {}
            for run in self._runs.values():
                if run.session_id != session_id:
                    continue
                best = latest.get(run.task_id)
                if best is None or (run.attempt, run.id) > (best.attempt, best.id):
                    latest[run.task_id] = run
            out = []
            for task in self._session_tasks(session_id):
                last = latest.get(task.task_id)
                running = last is not None and last.finished_at is None
                status = task_status(task.state, None if last is None else last.state, running)
                out.append(
                    TaskRecord(
                        task_id=task.task_id,
                        name=task.name,
                        status=status,
                        worker=None if last is None else last.worker,
                        dispatched_at=task.dispatched_at,
                        started_at=None if last is None else last.started_at,
                        finished_at=(last.finished_at if last is not None else None)
                        or task.finished_at,
                    )
                )
            for task_id, last in latest.items():  # registration not in the store yet
                if task_id in self._tasks:
                    continue
                running = last.finished_at is None
                out.append(
                    TaskRecord(
                        task_id=task_id,
                        name=last.name,
                        status=task_status(TaskStatus.PENDING.value, last.state, running),
                        worker=last.worker,
                        dispatched_at=last.started_at,
                        started_at=last.started_at,
                        finished_at=last.finished_at,
                    )
                )
            return out

    def lose_interrupted(self, nodename: str) -> list[Ended]:
        with self._lock:
            now = self._now()
            ids = []
            for run in self._runs.values():
                if run.worker == nodename and run.finished_at is None:
                    run.state, run.finished_at, run.error = RUN_LOST, now, _LOST_ERROR
                    ids.append(run.task_id)
            by_session: dict[str, list[str]] = {}
            for task_id in ids:
                task = self._tasks.get(task_id)
                if task is None or task.state != TaskStatus.PENDING.value:
                    continue
                if self._finished(task_id):
                    continue
                task.state, task.finished_at = TaskStatus.LOST.value, now
                by_session.setdefault(task.session_id, []).append(task_id)
            return [
                Ended(sid, SessionStatus.OPEN, "worker_restarted", (), tuple(lost))
                for sid, lost in by_session.items()
            ]

    def lose_missing(
        self, session_id: str, present: Collection[str], before: datetime
    ) -> Ended | None:
        _utc(before)
        with self._lock:
            here = set(present)
            lost = [
                t.task_id
                for t in self._unsettled_tasks(session_id)
                if t.dispatched_at <= before
                and t.task_id not in here
                and not self._in_progress(t.task_id)
            ]
            if not lost:
                return None
            self._settle_tasks(lost, TaskStatus.LOST, self._now())
            return Ended(session_id, SessionStatus.OPEN, Reason.WORKER_LOST.value, (), tuple(lost))

    def history(self, session_id: str, limit: int | None, bound: int) -> list[RunRecord]:
        keep = bound if limit is None else min(limit, bound)
        with self._lock:
            newest = self._finished_runs(session_id)[: max(keep, 0)]
            return [
                RunRecord(
                    task_id=r.task_id,
                    name=r.name,
                    state=r.state,
                    worker=r.worker,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                    error=r.error,
                )
                for r in reversed(newest)
                if r.finished_at is not None
            ]

    def compact(self, session_id: str, keep_last: int, bound: int | None = None) -> int:
        with self._lock:
            if bound is not None:
                self._trim(session_id, bound)
            return self._trim(session_id, keep_last)

    def trim_history(self, bound: int, *, batch: int) -> int:
        with self._lock:
            counts: dict[str, int] = {}
            for run in self._runs.values():
                if run.finished_at is not None:
                    counts[run.session_id] = counts.get(run.session_id, 0) + 1
            over = sorted(sid for sid, n in counts.items() if n > bound)[: max(batch, 0)]
            return sum(self._trim(sid, bound) for sid in over)

    # -- workers -----------------------------------------------------------------------

    def register_worker(
        self,
        nodename: str,
        *,
        host: str,
        pid: int,
        queue: str,
        max_sessions: int,
        is_alive: Callable[[str | None, int, float], bool],
    ) -> None:
        with self._lock:
            now = self._now()
            row = self._workers.get(nodename)
            if row is not None and (row.host, row.pid) != (host, pid):
                age = (now - row.last_heartbeat_at).total_seconds()
                if row.status is WorkerStatus.ONLINE and is_alive(row.host, row.pid, age):
                    where = f"on {row.host}" if row.host else "elsewhere"
                    raise NodeNameInUse(
                        f"a worker named {nodename} is already running (pid {row.pid} {where}, "
                        f"last heartbeat {age:.1f} s ago): start this one with its own node "
                        "name, e.g. `celery worker -n w2@%h`. Two processes with one name "
                        "would split a session's tasks and share one cap."
                    )
            self._workers[nodename] = _Worker(
                nodename, host, pid, queue, max_sessions, WorkerStatus.ONLINE, now, now
            )

    def clock(self) -> datetime:
        return self._now()

    def heartbeat(
        self, nodename: str, *, at: datetime | None = None, max_sessions: int | None = None
    ) -> None:
        if at is not None:
            _utc(at)
        with self._lock:
            row = self._workers.get(nodename)
            if row is None:
                return
            row.last_heartbeat_at = at if at is not None else self._now()
            row.status = WorkerStatus.ONLINE
            if max_sessions is not None:
                row.max_sessions = max_sessions

    def worker_offline(self, nodename: str) -> None:
        with self._lock:
            row = self._workers.get(nodename)
            if row is not None:
                row.status = WorkerStatus.OFFLINE

    def silent_workers(self, min_age: float) -> list[tuple[str, float, WorkerStatus]]:
        with self._lock:
            now = self._now()
            busy = {
                row.hostname
                for row in self._sessions.values()
                if row.status is SessionStatus.OPEN
                or (row.status in _ENDED and row.settled_at is None)
            }
            return [
                (w.nodename, (now - w.last_heartbeat_at).total_seconds(), w.status)
                for w in self._workers.values()
                if w.nodename in busy and w.last_heartbeat_at < now - timedelta(seconds=min_age)
            ]

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            now = self._now()
            open_count: dict[str | None, int] = {}
            for row in self._sessions.values():
                if row.status is SessionStatus.OPEN:
                    open_count[row.hostname] = open_count.get(row.hostname, 0) + 1
            return [
                WorkerRecord(
                    nodename=w.nodename,
                    host=w.host,
                    pid=w.pid,
                    queue=w.queue,
                    max_sessions=w.max_sessions,
                    status=w.status,
                    started_at=w.started_at,
                    last_heartbeat_at=w.last_heartbeat_at,
                    heartbeat_age=(now - w.last_heartbeat_at).total_seconds(),
                    open_sessions=open_count.get(w.nodename, 0),
                )
                for w in sorted(self._workers.values(), key=lambda w: w.nodename)
            ]

    def take_lease(self, name: str, holder: str, ttl: float) -> bool:
        with self._lock:
            now = self._now()
            row = self._leases.get(name)
            if row is not None and row[0] != holder and not row[1] < now:
                return False
            self._leases[name] = (holder, now + timedelta(seconds=ttl))
            return True

    def holds_lease(self, name: str, holder: str) -> bool:
        with self._lock:
            row = self._leases.get(name)
            return row is not None and row[0] == holder and row[1] >= self._now()

    # -- state -------------------------------------------------------------------------

    def session_user(self, session_id: str) -> str | None:
        with self._lock:
            row = self._sessions.get(session_id)
            return None if row is None else row.new.user_id

    def state_read(self, scope: str, scope_id: str, key: str) -> tuple[Any, int]:
        with self._lock:
            entry = self._state.get((scope, scope_id), {}).get(key)
            if entry is None:
                return MISSING, 0
            return (MISSING if entry.deleted else copy_value(entry.value)), entry.version

    def state_scope(self, scope: str, scope_id: str) -> dict[str, tuple[Any, int]]:
        with self._lock:
            rows = self._state.get((scope, scope_id), {})
            return {
                key: (copy_value(rows[key].value), rows[key].version)
                for key in sorted(rows)
                if not rows[key].deleted
            }

    def state_write(
        self, session_id: str, writes: Sequence[StateWrite], limit: int
    ) -> dict[str, int]:
        with self._lock:
            if not writes:
                return {}
            self._writable(session_id)
            staged: dict[ScopeKey, dict[str, _Entry]] = {}
            versions: dict[str, int] = {}
            conflicts: list[str] = []
            for w in sorted(writes, key=lambda w: (w.scope, w.scope_id, w.key)):
                scope = (w.scope, w.scope_id)
                if scope not in staged:
                    staged[scope] = dict(self._state.get(scope, {}))
                rows = staged[scope]
                row = rows.get(w.key)
                deleted = w.value is MISSING
                size = 0 if deleted else w.size
                others = _others(rows, w.key)
                fits = others + size <= (_NO_LIMIT if deleted else limit)
                have = 0 if row is None else row.version
                if w.expected is None or w.expected == have:  # expected=0: no live row
                    if fits:
                        rows[w.key] = _entry(w.value, size, have + 1)
                        versions[w.key] = have + 1
                        continue
                    raise _size_error(w.scope, w.key, others + size, limit)
                conflicts.append(w.key)
            if conflicts:
                raise StateConflict(
                    f"state key(s) {', '.join(map(repr, sorted(conflicts)))} changed since this "
                    "task or client read them; nothing was written. Read them again with get() "
                    "and retry, or use increment()/append() for counters and lists",
                    sorted(conflicts),
                )
            self._state.update(staged)
            return versions

    def state_atomic(
        self,
        session_id: str,
        scope: str,
        scope_id: str,
        op: tuple[str, str, Any],
        value_limit: int,
        scope_limit: int,
    ) -> Any:
        key = op[1]
        with self._lock:
            self._writable(session_id)
            rows = self._state.get((scope, scope_id), {})
            row = rows.get(key)
            current = MISSING if row is None or row.deleted else copy_value(row.value)
            value = apply_op(current, op)
            _, size = check_value(key, value, value_limit)
            others = _others(rows, key)
            if others + size > scope_limit:
                raise _size_error(scope, key, others + size, scope_limit)
            self._put(scope, scope_id, key, value, size)
            return value

    def state_clear(self, session_id: str) -> None:
        with self._lock:
            self._writable(session_id)
            rows = self._state.get(("session", session_id), {})
            for key, row in rows.items():
                if not row.deleted:
                    rows[key] = _entry(MISSING, 0, row.version + 1)

    # -- branches ----------------------------------------------------------------------

    def branch_view(self, group_id: str, member: int, seq: int) -> BranchStart | None:
        with self._lock:
            group = self._groups.get(group_id)
            if group is None or group.status != "open":
                return None
            earlier: list[Op] = []
            if seq:
                for (m, s), (status, ops) in sorted(group.steps.items()):
                    if m == member and s < seq and status == "done":
                        earlier.extend(_copy_ops(ops or ()))
            if not group.snapshot_taken:
                group.snapshot, group.snapshot_taken = self._session_values(group.session_id), True
            return BranchStart(copy_value(group.snapshot), earlier)

    def branch_done(
        self, group_id: str, member: int, seq: int, ops: list[Op], merger: Merger
    ) -> Exception | None:
        with self._lock:
            group = self._group(group_id)
            if (member, seq) in group.steps:
                return None
            group.steps[(member, seq)] = ("done", _copy_ops(ops))
            return self._count(group_id, group, 1, merger)

    def branch_failed(
        self, group_id: str, member: int, seq: int, member_len: int, merger: Merger
    ) -> Exception | None:
        with self._lock:
            group = self._group(group_id)
            dropped = 0
            for s in range(seq, max(member_len, seq + 1)):
                if (member, s) not in group.steps:
                    group.steps[(member, s)] = ("failed", None)
                    dropped += 1
            return self._count(group_id, group, dropped, merger) if dropped else None

    # -- retention ---------------------------------------------------------------------

    def prune(self, ended_before: datetime, *, batch: int, dry_run: bool = False) -> PruneCounts:
        _utc(ended_before)
        with self._lock:
            due = sorted(
                (
                    row
                    for row in self._sessions.values()
                    if row.status in _ENDED
                    and row.settled_at is not None
                    and row.closed_at is not None
                    and row.closed_at < ended_before
                ),
                key=lambda row: (row.closed_at, row.id),
            )
            ids = {row.id for row in (due if dry_run else due[: max(batch, 0)])}
            if not ids:
                return PruneCounts()
            counts = PruneCounts(
                sessions=len(ids),
                tasks=sum(1 for t in self._tasks.values() if t.session_id in ids),
                runs=sum(1 for r in self._runs.values() if r.session_id in ids),
                state_keys=sum(len(self._state.get(("session", sid), {})) for sid in ids),
            )
            if not dry_run:
                for sid in ids:
                    del self._sessions[sid]
                    self._state.pop(("session", sid), None)
                self._tasks = {k: t for k, t in self._tasks.items() if t.session_id not in ids}
                self._runs = {k: r for k, r in self._runs.items() if r.session_id not in ids}
                self._groups = {k: g for k, g in self._groups.items() if g.session_id not in ids}
            return counts

    # -- helpers (called with the lock held) -------------------------------------------

    def _session_tasks(self, session_id: str) -> list[_Task]:
        found = [t for t in self._tasks.values() if t.session_id == session_id]
        return sorted(found, key=lambda t: (t.dispatched_at, t.task_id))

    def _unsettled_tasks(self, session_id: str) -> Iterable[_Task]:
        """Registered tasks still pending with no run ended in a final state."""
        return [
            t
            for t in self._session_tasks(session_id)
            if t.state == TaskStatus.PENDING.value and not self._finished(t.task_id)
        ]

    def _finished(self, task_id: str) -> bool:
        return any(
            r.task_id == task_id and r.state in RUN_FINAL_STATES for r in self._runs.values()
        )

    def _in_progress(self, task_id: str) -> bool:
        return any(r.task_id == task_id and r.finished_at is None for r in self._runs.values())

    def _settle_tasks(self, task_ids: Iterable[str], status: TaskStatus, now: datetime) -> None:
        for task_id in task_ids:
            task = self._tasks[task_id]
            task.state, task.finished_at = status.value, now

    def _close_runs(self, task_ids: Collection[str], now: datetime) -> None:
        for run in self._runs.values():
            if run.task_id in task_ids and run.finished_at is None:
                run.state, run.finished_at, run.error = RUN_LOST, now, _LOST_ERROR

    def _finished_runs(self, session_id: str) -> list[_Run]:
        """A session's finished runs, newest first."""
        found = [
            r
            for r in self._runs.values()
            if r.session_id == session_id and r.finished_at is not None
        ]
        return sorted(found, key=lambda r: (r.started_at, r.id), reverse=True)

    def _trim(self, session_id: str, keep: int) -> int:
        older = self._finished_runs(session_id)[max(keep, 0) :]
        for run in older:
            del self._runs[(run.session_id, run.task_id, run.attempt)]
        return len(older)

    def _writable(self, session_id: str) -> None:
        row = self._sessions.get(session_id)
        if row is None:
            raise SessionNotFound(
                f"no session {session_id!r} in the store: its state cannot be written"
            )
        if row.status not in _WRITABLE:
            raise ended_error(session_id, row.status.value, row.reason)

    def _session_values(self, session_id: str) -> dict[str, Any]:
        rows = self._state.get(("session", session_id), {})
        return {k: copy_value(e.value) for k, e in sorted(rows.items()) if not e.deleted}

    def _put(self, scope: str, scope_id: str, key: str, value: Any, size: int) -> None:
        rows = self._state.setdefault((scope, scope_id), {})
        row = rows.get(key)
        rows[key] = _entry(value, size, 1 if row is None else row.version + 1)

    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            raise StoreError(f"session store write refused: no branch group {group_id!r}")
        return group

    def _count(self, group_id: str, group: _Group, n: int, merger: Merger) -> Exception | None:
        if group.status != "open":
            return None
        group.finished += n
        if group.finished < group.size:
            return None
        return self._merge(group, merger)

    def _merge(self, group: _Group, merger: Merger) -> Exception | None:
        session = self._sessions[group.session_id]
        logs: dict[int, list[Op]] = {}
        for (member, _), (status, ops) in sorted(group.steps.items()):
            if status == "done":
                logs.setdefault(member, []).extend(_copy_ops(ops or ()))
        ordered = [logs[k] for k in sorted(logs)]
        keys = {op[1] for log in ordered for op in log}
        rows = self._state.setdefault(("session", group.session_id), {})
        live = {}
        for key in sorted(keys):
            row = rows.get(key)
            if row is None:  # locked as a tombstone of version 0, as the SQL store does
                row = rows[key] = _entry(MISSING, 0, 0)
            if not row.deleted:
                live[key] = copy_value(row.value)
        new = session.new
        try:
            merged = merger(
                live, copy_value(group.snapshot), ordered, new.merge_policy, new.reducers
            )
            sizes = {k: 0 if v is MISSING else check_value(k, v)[1] for k, v in merged.items()}
        except Exception as exc:  # conflict, unknown reducer, a reducer returned non-JSON
            group.status = "conflict"
            group.conflict = getattr(exc, "keys", None) or sorted(keys)
            group.merged_at = self._now()
            return exc
        for key, value in merged.items():
            self._put("session", group.session_id, key, value, sizes[key])
        group.status, group.merged_at = "merged", self._now()
        return None


def _record(row: _Session, last_heartbeat_at: datetime | None = None) -> SessionRecord:
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
        settled=row.settled_at is not None or row.status not in _ENDED,
        last_heartbeat_at=last_heartbeat_at,
    )


def _moving(row: _Session) -> bool:
    return row.status is SessionStatus.PENDING and row.reason == Reason.MOVING.value


def _json(value: Any) -> Any:
    """A copy of a JSON value; what a JSON column refuses is a StoreError here too."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"session store write failed: {type(exc).__name__}") from None


def _utc(value: datetime) -> None:
    """Refuse naive datetimes, as the SQL store's column type does."""
    if value.tzinfo is None:
        raise StoreError("session store refused a naive datetime: pass timezone-aware UTC times")


def _merged(batch: Sequence[Run]) -> list[Run]:
    """One record per (session, task, attempt): the end wins over the start of the same run."""
    merged: dict[tuple[str, str, int], Run] = {}
    for run in batch:
        key = (run.session_id, run.task_id, run.attempt)
        earlier = merged.get(key)
        if earlier is None or earlier.finished_at is None:
            merged[key] = run
    return list(merged.values())


def _entry(value: Any, size: int, version: int) -> _Entry:
    if value is MISSING:
        return _Entry(None, 0, version, True)
    return _Entry(_json(value), size, version, False)


def _others(rows: dict[str, _Entry], key: str) -> int:
    return sum(e.size for k, e in rows.items() if k != key)


def _copy_ops(ops: Iterable[Op]) -> list[Op]:
    return [(kind, key, _json(arg)) for kind, key, arg in ops]


def _size_error(scope: str, key: str, total: int, limit: int) -> StateValueError:
    return StateValueError(
        f"state key {key!r}: the {scope} state would take {total} bytes, more than "
        f"sessionflow_state_max_session_bytes ({limit}); delete keys you no longer "
        "need or store references instead; nothing was written",
        key,
    )


__all__ = ["MemoryStore"]

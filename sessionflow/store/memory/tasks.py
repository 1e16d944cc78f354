"""Task registrations, runs and history in memory, and what a session's end or move
does to its unfinished tasks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime

from ...enums import RUN_FINAL_STATES, RUN_LOST, Reason, SessionStatus, TaskStatus
from ...errors import StoreRefused
from ...records import Dispatch, Ended, Run, RunRecord, TaskRecord, check_utc, runs_to_write
from ..sql.tasks import task_status
from ._data import ENDED, Group, MemoryBase, RunRow, TaskRow

_LOST_ERROR = "the worker process died"


class TasksMemory(MemoryBase):
    """Tasks and runs: a part of :class:`~sessionflow.store.memory.MemoryStore`."""

    def dispatch(self, dispatch: Dispatch) -> str | None:
        check_utc(dispatch.at)
        with self._lock:
            row = self._sessions.get(dispatch.session_id)
            n = len(dispatch.tasks)
            if row is None or row.status is not SessionStatus.OPEN:
                return None
            if row.new.max_turns is not None and row.turns + n > row.new.max_turns:
                return None
            group_ids = [g.id for g in dispatch.groups]
            if len(set(group_ids)) != len(group_ids) or any(g in self._groups for g in group_ids):
                raise StoreRefused("session store write refused: a branch group id exists")
            row.turns += n
            self._register(row.id, dispatch.tasks, dispatch.at)
            for spec in dispatch.groups:
                snapshot = self._session_values(row.id) if spec.snapshot_now else {}
                self._groups[spec.id] = Group(
                    row.id, spec.size, spec.snapshot_now, snapshot, dispatch.at
                )
            return row.queue

    def late_dispatch(self, dispatch: Dispatch) -> tuple[str, ...]:
        check_utc(dispatch.at)
        with self._lock:
            row = self._sessions.get(dispatch.session_id)
            if row is not None and (
                row.status is SessionStatus.OPEN or (row.status in ENDED and row.settled_at is None)
            ):
                row.turns += len(dispatch.tasks)
                self._register(row.id, dispatch.tasks, dispatch.at)
                return ()
            return tuple(t for t, _ in dispatch.tasks if t not in self._tasks)

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

    def settle(
        self, session_id: str, *, running: Collection[str] = (), lose_started: bool = False
    ) -> Ended | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status not in ENDED or row.settled_at is not None:
                return None
            now = self._now()
            row.settled_at = now
            started = set(running)
            self._register(session_id, [(t, None) for t in sorted(started)], now)
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

    def record_runs(self, runs: Sequence[Run]) -> None:
        if not runs:
            return
        for run in runs:
            check_utc(run.started_at)
            if run.finished_at is not None:
                check_utc(run.finished_at)
        with self._lock:
            merged = runs_to_write(runs)
            unknown = sorted({r.session_id for r in merged} - set(self._sessions))
            if unknown:
                raise StoreRefused(f"session store write refused: no session {unknown[0]!r}")
            for run in merged:
                key = (run.session_id, run.task_id, run.attempt)
                old = self._runs.get(key)
                if old is None:
                    self._run_ids += 1
                    self._runs[key] = RunRow(
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
            latest: dict[str, RunRow] = {}
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
                        name=task.name if task.name is not None or last is None else last.name,
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

    def lose_interrupted(
        self, nodename: str, *, silent_for: float | None = None, reason: str = "worker_restarted"
    ) -> list[Ended]:
        with self._lock:
            now = self._now()
            ids = []
            for run in self._runs.values():
                if run.worker != nodename or run.finished_at is not None:
                    continue
                session = self._sessions.get(run.session_id)
                if silent_for is not None and (
                    session is None or session.new.heartbeat_timeout >= silent_for
                ):
                    continue
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
                Ended(sid, SessionStatus.OPEN, reason, (), tuple(lost))
                for sid, lost in by_session.items()
            ]

    def lose_missing(
        self, session_id: str, present: Collection[str], before: datetime
    ) -> Ended | None:
        check_utc(before)
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

    def reclaim(self) -> None:
        """Nothing to do: deleted rows are garbage-collected."""

    # -- helpers (called with the lock held) -------------------------------------------

    def _session_tasks(self, session_id: str) -> list[TaskRow]:
        found = [t for t in self._tasks.values() if t.session_id == session_id]
        return sorted(found, key=lambda t: (t.dispatched_at, t.task_id))

    def _register(
        self, session_id: str, tasks: Iterable[tuple[str, str | None]], at: datetime
    ) -> None:
        """Pending rows for the tasks not registered yet (a task id is never re-used)."""
        for task_id, name in tasks:
            if task_id not in self._tasks:
                self._tasks[task_id] = TaskRow(task_id, session_id, name, at)

    def _unsettled_tasks(self, session_id: str) -> Iterable[TaskRow]:
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

    def _finished_runs(self, session_id: str) -> list[RunRow]:
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

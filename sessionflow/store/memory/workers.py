"""Workers, heartbeats, leases and the store's generated key, in memory."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from ...enums import SessionStatus, WorkerStatus
from ...errors import NodeNameInUse
from ...records import WorkerRecord, check_utc
from ._data import ENDED, MemoryBase, WorkerRow


class WorkersMemory(MemoryBase):
    """Workers and leases: a part of :class:`~sessionflow.store.memory.MemoryStore`."""

    def register_worker(
        self,
        nodename: str,
        *,
        host: str,
        pid: int,
        queue: str,
        max_sessions: int,
        is_alive: Callable[[str | None, int, float], bool],
        resources: dict[str, int] | None = None,
        labels: dict[str, str] | None = None,
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
            self._workers[nodename] = WorkerRow(
                nodename,
                host,
                pid,
                queue,
                max_sessions,
                WorkerStatus.ONLINE,
                now,
                now,
                dict(resources or {}),
                dict(labels or {}),
            )

    def clock(self) -> datetime:
        return self._now()

    def heartbeat(
        self,
        nodename: str,
        *,
        at: datetime | None = None,
        max_sessions: int | None = None,
        resources: dict[str, int] | None = None,
        labels: dict[str, str] | None = None,
        online: bool = True,
    ) -> None:
        if at is not None:
            check_utc(at)
        with self._lock:
            row = self._workers.get(nodename)
            if row is None:
                return
            row.last_heartbeat_at = at if at is not None else self._now()
            if online:
                row.status = WorkerStatus.ONLINE
            if max_sessions is not None:
                row.max_sessions = max_sessions
            if resources is not None:
                row.resources = dict(resources)
            if labels is not None:
                row.labels = dict(labels)

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
                or (row.status in ENDED and row.settled_at is None)
            }
            busy |= {r.worker for r in self._runs.values() if r.finished_at is None}
            return [
                (w.nodename, (now - w.last_heartbeat_at).total_seconds(), w.status)
                for w in self._workers.values()
                if w.nodename in busy and w.last_heartbeat_at < now - timedelta(seconds=min_age)
            ]

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            now = self._now()
            open_count: dict[str | None, int] = {}
            usage: dict[str | None, dict[str, int]] = {}
            for row in self._sessions.values():
                if row.status is SessionStatus.OPEN:
                    open_count[row.hostname] = open_count.get(row.hostname, 0) + 1
                    used = usage.setdefault(row.hostname, {})
                    for name, amount in (row.new.requires or {}).items():
                        used[name] = used.get(name, 0) + amount
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
                    resources=dict(w.resources),
                    labels=dict(w.labels),
                    usage=dict(usage.get(w.nodename, {})),
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

    def secret(self) -> bytes:
        with self._lock:
            if self._secret is None:
                self._secret = secrets.token_bytes(32)
            return self._secret

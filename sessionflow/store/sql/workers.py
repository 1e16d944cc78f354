"""Workers, heartbeats, leases and the store's generated key, in SQL."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import exists, func, insert, literal, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ...enums import SessionStatus, WorkerStatus
from ...errors import NodeNameInUse, StoreError
from ...records import WorkerRecord, utcnow
from .engine import Engines
from .models import ENDED, UTCDateTime, leases, meta, runs, sessions, workers

W, S, L, R = workers.c, sessions.c, leases.c, runs.c


def db_now(conn: Connection) -> datetime:
    """The store's clock (PostgreSQL), or this machine's (SQLite: one machine anyway)."""
    if conn.dialect.name == "postgresql":
        value: datetime = conn.execute(select(func.now())).scalar_one()
        return aware(value)
    return utcnow()


def _now_and(conn: Connection, seconds: float) -> tuple[Any, Any]:
    """(now, now + seconds) as SQL on PostgreSQL (the store's clock), values on SQLite."""
    if conn.dialect.name == "postgresql":
        now = func.now()
        return now, now + timedelta(seconds=seconds)
    value = utcnow()
    return value, value + timedelta(seconds=seconds)


def literal_column_now(now: Any) -> Any:
    """``now`` (SQL or a value) as a result column named ``now``."""
    return (now if not isinstance(now, datetime) else literal(now, UTCDateTime())).label("now")


def add_up(requested: Any) -> dict[str, int]:
    """The sum of a worker's open sessions' ``requires`` (a JSON array, text on SQLite)."""
    if isinstance(requested, (str, bytes)):
        requested = json.loads(requested)
    total: dict[str, int] = {}
    for amounts in requested or ():
        for name, amount in (amounts or {}).items():
            total[name] = total.get(name, 0) + int(amount)
    return total


def aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class WorkersSQL:
    """Worker rows, leases and meta values: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

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
        values = {
            "host": host,
            "queue": queue,
            "pid": pid,
            "max_sessions": max_sessions,
            "status": WorkerStatus.ONLINE.value,
            "resources": dict(resources or {}),
            "labels": dict(labels or {}),
        }
        with self.engines.write() as conn:
            now = db_now(conn)
            row = conn.execute(
                select(W.host, W.pid, W.status, W.last_heartbeat_at)
                .where(W.nodename == nodename)
                .with_for_update()
            ).first()
            if row is not None and (row.host, row.pid) != (host, pid):
                age = (now - aware(row.last_heartbeat_at)).total_seconds()
                if row.status == WorkerStatus.ONLINE.value and is_alive(row.host, row.pid, age):
                    where = f"on {row.host}" if row.host else "elsewhere"
                    raise NodeNameInUse(
                        f"a worker named {nodename} is already running (pid {row.pid} {where}, "
                        f"last heartbeat {age:.1f} s ago): start this one with its own node "
                        "name, e.g. `celery worker -n w2@%h`. Two processes with one name "
                        "would split a session's tasks and share one cap."
                    )
            if row is None:
                try:
                    conn.execute(
                        insert(workers).values(
                            nodename=nodename, started_at=now, last_heartbeat_at=now, **values
                        )
                    )
                except IntegrityError:  # another process inserted it meanwhile
                    raise NodeNameInUse(
                        f"another worker registered as {nodename} at the same moment: give "
                        "each worker its own node name with -n"
                    ) from None
            else:
                conn.execute(
                    update(workers)
                    .where(W.nodename == nodename)
                    .values(started_at=now, last_heartbeat_at=now, **values)
                )

    def clock(self) -> datetime:
        with self.engines.read() as conn:
            return db_now(conn)

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
        with self.engines.single() as conn:
            now = func.now() if conn.dialect.name == "postgresql" else utcnow()
            values: dict[str, object] = {"last_heartbeat_at": at if at is not None else now}
            if online:
                values["status"] = WorkerStatus.ONLINE.value
            if max_sessions is not None:
                values["max_sessions"] = max_sessions
            if resources is not None:
                values["resources"] = dict(resources)
            if labels is not None:
                values["labels"] = dict(labels)
            conn.execute(update(workers).where(W.nodename == nodename).values(**values))

    def worker_offline(self, nodename: str) -> None:
        with self.engines.single() as conn:
            conn.execute(
                update(workers)
                .where(W.nodename == nodename)
                .values(status=WorkerStatus.OFFLINE.value)
            )

    def silent_workers(self, min_age: float) -> list[tuple[str, float, WorkerStatus]]:
        has_work = or_(
            exists().where(S.hostname == W.nodename, S.status == SessionStatus.OPEN.value),
            exists().where(S.hostname == W.nodename, S.status.in_(ENDED), S.settled_at.is_(None)),
            exists().where(R.worker == W.nodename, R.finished_at.is_(None)),
        )
        with self.engines.read() as conn:
            now, _ = _now_and(conn, 0)  # PostgreSQL: the store's clock, in the same query
            rows = conn.execute(
                select(W.nodename, W.last_heartbeat_at, W.status, literal_column_now(now)).where(
                    W.last_heartbeat_at < now - timedelta(seconds=min_age), has_work
                )
            ).all()
        return [
            (
                r.nodename,
                (aware(r.now) - aware(r.last_heartbeat_at)).total_seconds(),
                WorkerStatus(r.status),
            )
            for r in rows
        ]

    def workers(self) -> list[WorkerRecord]:
        mine = (S.hostname == W.nodename, S.status == SessionStatus.OPEN.value)
        open_count = select(func.count()).where(*mine).scalar_subquery()
        with self.engines.read() as conn:
            # Usage in the same statement: the ``requires`` of every open session, as one
            # JSON array per worker (added up below).
            aggregate = (
                func.json_agg(S.requires)
                if conn.dialect.name == "postgresql"
                else func.json_group_array(func.json(S.requires))
            )
            requested = select(aggregate).where(*mine, S.requires.is_not(None)).scalar_subquery()
            now = db_now(conn)
            rows = conn.execute(
                select(workers, open_count.label("open"), requested.label("requested")).order_by(
                    W.nodename
                )
            )
            return [
                WorkerRecord(
                    nodename=r.nodename,
                    host=r.host,
                    pid=r.pid,
                    queue=r.queue,
                    max_sessions=r.max_sessions,
                    status=WorkerStatus(r.status),
                    started_at=r.started_at,
                    last_heartbeat_at=r.last_heartbeat_at,
                    heartbeat_age=(now - aware(r.last_heartbeat_at)).total_seconds(),
                    open_sessions=int(r.open),
                    resources=dict(r.resources or {}),
                    labels=dict(r.labels or {}),
                    usage=add_up(r.requested),
                )
                for r in rows
            ]

    # -- leases -------------------------------------------------------------------

    def take_lease(self, name: str, holder: str, ttl: float) -> bool:
        # The common case (renewing, or taking an expired lease) is one statement.
        with self.engines.single() as conn:
            now, until = _now_and(conn, ttl)
            renewed = conn.execute(
                update(leases)
                .where(L.name == name, or_(L.holder == holder, L.expires_at < now))
                .values(holder=holder, expires_at=until)
            ).rowcount
        if renewed:
            return True
        try:
            with self.engines.write() as conn:
                now, until = _now_and(conn, ttl)
                taken = conn.execute(
                    update(leases)
                    .where(L.name == name, or_(L.holder == holder, L.expires_at < now))
                    .values(holder=holder, expires_at=until)
                ).rowcount
                if taken:
                    return True
                if conn.execute(select(L.name).where(L.name == name)).first() is not None:
                    return False
                conn.execute(insert(leases).values(name=name, holder=holder, expires_at=until))
                return True
        except StoreError:  # another process created the lease at the same moment
            return self.holds_lease(name, holder)

    def holds_lease(self, name: str, holder: str) -> bool:
        with self.engines.read() as conn:
            now = db_now(conn)
            return (
                conn.execute(
                    select(L.name).where(L.name == name, L.holder == holder, L.expires_at >= now)
                ).first()
                is not None
            )

    # -- meta ---------------------------------------------------------------------

    def secret(self) -> bytes:
        query = select(meta.c.value).where(meta.c.key == "signing_key")
        with self.engines.read() as conn:
            value = conn.execute(query).scalar()
        if value is None:
            try:
                with self.engines.write() as conn:
                    value = conn.execute(query).scalar()
                    if value is None:
                        value = secrets.token_hex(32)
                        conn.execute(insert(meta).values(key="signing_key", value=value))
            except StoreError:  # another process created it at the same moment: read theirs
                with self.engines.read() as conn:
                    value = conn.execute(query).scalar_one()
        return bytes.fromhex(value)

"""Sessions in SQL: creation, admission, ends and moves."""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ...enums import Reason, SessionStatus
from ...records import Ended, NewSession, SessionRecord, utcnow
from .engine import Engines
from .models import ENDED, sessions, workers

S = sessions.c
_OPEN, _PENDING = SessionStatus.OPEN.value, SessionStatus.PENDING.value


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


_NEW_FIELDS = _names(NewSession)  # each is a column of sf_sessions, by the same name
_RECORD_COLUMNS = tuple(
    n
    for n in _names(SessionRecord)
    if n not in ("status", "survive_restart", "settled", "last_heartbeat_at")
)


def _values(new: NewSession, status: str) -> dict[str, Any]:
    """The columns of a new session row."""
    values = {name: getattr(new, name) for name in _NEW_FIELDS}
    values.update(status=status, turns=0)
    return values


# Statements are built once per dialect and shape and executed with the row as
# parameters: building an upsert (its ``excluded`` alias) cost more CPU than running it.


@functools.cache
def _insert_new(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id: of two racing inserts, one wins."""
    return _insert(dialect).on_conflict_do_nothing(index_elements=[S.id]).returning(S.id)


@functools.cache
def _upsert_pending(dialect: str, columns: tuple[str, ...], whole_row: bool) -> Any:
    """Insert the session, or overwrite ``columns`` of its row if that is still pending
    (and not moving): whatever the order, a new session is opened or abandoned once.
    Returns the row (``whole_row``) or its id."""
    insert_ = _insert(dialect)
    return insert_.on_conflict_do_update(
        index_elements=[S.id],
        set_={name: insert_.excluded[name] for name in columns},
        where=and_(S.status == _PENDING, or_(S.reason.is_(None), S.reason != Reason.MOVING.value)),
    ).returning(sessions if whole_row else S.id)


def _insert(dialect: str) -> Any:
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(sessions)


def _new_session(row: RowMapping) -> NewSession:
    values = {name: row[name] for name in _NEW_FIELDS}
    values["survive_restart"] = bool(values["survive_restart"])
    return NewSession(**values)


def session_record(row: RowMapping) -> SessionRecord:
    return SessionRecord(
        status=SessionStatus(row["status"]),
        survive_restart=bool(row["survive_restart"]),
        settled=row["settled_at"] is not None or row["status"] not in ENDED,
        last_heartbeat_at=row.get("last_heartbeat_at"),  # only when joined with its worker
        **{name: row[name] for name in _RECORD_COLUMNS},
    )


class SessionsSQL:
    """The session rows' half of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

    def create_pending(self, new: NewSession) -> bool:
        with self.engines.single() as conn:
            row = conn.execute(_insert_new(conn.dialect.name), _values(new, _PENDING)).first()
        return row is not None

    def open_new(self, new: NewSession, nodename: str, queue: str) -> SessionRecord | None:
        now = utcnow()
        values = _values(new, _OPEN)
        values.update(
            hostname=nodename,
            queue=queue,
            opened_at=now,
            last_activity_at=now,
            deadline_at=now + timedelta(seconds=new.execution_timeout),
            expires_at=None if new.ttl is None else new.created_at + timedelta(seconds=new.ttl),
        )
        taken = ("status", "hostname", "queue", "opened_at", "last_activity_at", "deadline_at")
        with self.engines.single() as conn:
            stmt = _upsert_pending(conn.dialect.name, (*taken, "expires_at", "reason"), True)
            row = conn.execute(stmt, values).mappings().first()
        return None if row is None else session_record(row)

    def abandon_new(self, new: NewSession, reason: str) -> bool:
        now = utcnow()
        values = _values(new, SessionStatus.FAILED.value)
        values.update(reason=reason, closed_at=now, settled_at=now)
        with self.engines.single() as conn:
            stmt = _upsert_pending(
                conn.dialect.name, ("status", "reason", "closed_at", "settled_at"), False
            )
            row = conn.execute(stmt, values).first()
        return row is not None

    def stale_pending(self) -> list[NewSession]:
        now = utcnow()
        with self.engines.read() as conn:
            rows = conn.execute(
                select(sessions).where(
                    S.status == _PENDING,
                    or_(S.reason.is_(None), S.reason != Reason.MOVING.value),
                )
            ).mappings()
            found = [_new_session(row) for row in rows]
        return [n for n in found if n.created_at + timedelta(seconds=n.creation_timeout) <= now]

    def get_session(self, session_id: str, *, with_heartbeat: bool = False) -> SessionRecord | None:
        query = select(sessions).where(S.id == session_id)
        if with_heartbeat:
            query = (
                select(sessions, workers.c.last_heartbeat_at)
                .select_from(sessions.outerjoin(workers, workers.c.nodename == S.hostname))
                .where(S.id == session_id)
            )
        with self.engines.read() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else session_record(row)

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
        moving = and_(S.status == _PENDING, S.reason == Reason.MOVING.value)
        query = select(sessions).where(or_(S.status != _PENDING, moving))
        if status is SessionStatus.OPEN:
            query = query.where(or_(S.status == _OPEN, moving))
        elif status is not None:
            query = query.where(S.status == status.value)
        for column, value in ((S.user_id, user_id), (S.agent_id, agent_id), (S.hostname, hostname)):
            if value is not None:
                query = query.where(column == value)
        if created_after is not None:
            query = query.where(S.created_at >= created_after)
        if created_before is not None:
            query = query.where(S.created_at < created_before)
        order = (S.created_at.desc(), S.id.desc()) if newest_first else (S.created_at, S.id)
        query = query.order_by(*order)
        if limit is not None:
            query = query.limit(limit)
        with self.engines.read() as conn:
            return [session_record(row) for row in conn.execute(query).mappings()]

    def statuses(self, session_ids: Collection[str]) -> dict[str, tuple[SessionStatus, str | None]]:
        ids = sorted(set(session_ids))
        if not ids:
            return {}
        with self.engines.read() as conn:
            rows = conn.execute(select(S.id, S.status, S.reason).where(S.id.in_(ids))).all()
        return {row.id: (SessionStatus(row.status), row.reason) for row in rows}

    def abandon_pending(
        self, session_id: str, reason: str, *, status: SessionStatus = SessionStatus.FAILED
    ) -> bool:
        now = utcnow()  # nothing of it ever ran: settled when it ends
        with self.engines.single() as conn:
            result = conn.execute(
                update(sessions)
                .where(
                    S.id == session_id,
                    S.status == _PENDING,
                    or_(S.reason.is_(None), S.reason != Reason.MOVING.value),
                )
                .values(
                    status=SessionStatus(status).value,
                    reason=reason,
                    closed_at=now,
                    settled_at=now,
                )
            )
            return result.rowcount == 1

    def admit(self, session_id: str, nodename: str, queue: str) -> SessionRecord | None:
        now = utcnow()
        with self.engines.write() as conn:
            row = conn.execute(
                select(S.execution_timeout, S.ttl, S.created_at, S.target_worker, S.reason).where(
                    S.id == session_id, S.status == _PENDING
                )
            ).first()
            if row is None or row.target_worker not in (None, nodename):
                return None
            values: dict[str, Any] = {
                "status": _OPEN,
                "hostname": nodename,
                "queue": queue,
                "reason": None,
                "last_activity_at": now,
            }
            if row.reason != Reason.MOVING.value:  # a moved session keeps its clocks
                values.update(
                    opened_at=now,
                    deadline_at=now + timedelta(seconds=row.execution_timeout),
                    expires_at=None
                    if row.ttl is None
                    else row.created_at + timedelta(seconds=row.ttl),
                )
            opened = (
                conn.execute(
                    update(sessions)
                    .where(S.id == session_id, S.status == _PENDING)
                    .values(**values)
                    .returning(sessions)
                )
                .mappings()
                .first()
            )
            return None if opened is None else session_record(opened)

    def end_session(
        self,
        session_id: str,
        status: SessionStatus,
        reason: str,
        *,
        from_states: Collection[SessionStatus] = (SessionStatus.OPEN,),
        hostname: str | None = None,
    ) -> bool:
        condition = [S.id == session_id, S.status.in_([s.value for s in from_states])]
        if hostname is not None:
            condition.append(S.hostname == hostname)
        with self.engines.single() as conn:
            # The store's clock, as heartbeats use: "did the worker beat after the end?"
            now = func.now() if conn.dialect.name == "postgresql" else utcnow()
            result = conn.execute(
                update(sessions)
                .where(*condition)
                .values(status=status.value, reason=reason, closed_at=now, settled_at=None)
            )
            return result.rowcount == 1

    def unsettled(self, hostname: str | None = None) -> list[tuple[str, str | None]]:
        query = select(S.id, S.hostname).where(S.status.in_(ENDED), S.settled_at.is_(None))
        if hostname is not None:
            query = query.where(S.hostname == hostname)
        with self.engines.read() as conn:
            return [(row.id, row.hostname) for row in conn.execute(query)]

    def stalled_moves(self) -> list[str]:
        now = utcnow()
        with self.engines.read() as conn:
            rows = conn.execute(
                select(S.id, S.last_activity_at, S.creation_timeout).where(
                    S.status == _PENDING, S.reason == Reason.MOVING.value
                )
            ).all()
        return [
            r.id for r in rows if r.last_activity_at + timedelta(seconds=r.creation_timeout) <= now
        ]

    def moving(self) -> list[SessionRecord]:
        with self.engines.read() as conn:
            rows = conn.execute(
                select(sessions).where(S.status == _PENDING, S.reason == Reason.MOVING.value)
            ).mappings()
            return [session_record(row) for row in rows]

    def open_sessions(self, nodename: str) -> list[SessionRecord]:
        with self.engines.read() as conn:
            rows = conn.execute(
                select(sessions).where(S.hostname == nodename, S.status == _OPEN)
            ).mappings()
            return [session_record(row) for row in rows]

    def open_ids(self, nodename: str) -> set[str]:
        with self.engines.read() as conn:
            query = select(S.id).where(S.hostname == nodename, S.status == _OPEN)
            return set(conn.execute(query).scalars())

    def session_user(self, session_id: str) -> str | None:
        with self.engines.read() as conn:
            user: str | None = conn.execute(select(S.user_id).where(S.id == session_id)).scalar()
            return user


__all__ = ["Ended", "SessionsSQL", "session_record"]

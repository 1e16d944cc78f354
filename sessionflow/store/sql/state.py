"""Session state in SQL: versioned rows, compare-and-set, size limits, atomic operations.

Every key is a row ``(scope, scope_id, key)`` with an integer version that grows
on every change, deletes included (a tombstone keeps the version). A write from
a session's ``State`` happens only while that session is open: the condition is
part of the write statement itself, so it costs no extra round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    String,
    and_,
    bindparam,
    cast,
    exists,
    func,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from ...enums import SessionStatus
from ...errors import SessionNotFound, StateConflict, StateValueError, ended_error
from ...merge import MISSING, apply_op, check_value
from ...records import StateWrite, utcnow
from .engine import Engines
from .models import sessions, state_entries

_c = state_entries.c
_WRITABLE = (SessionStatus.OPEN.value, SessionStatus.PENDING.value)
_COLUMNS = ("scope", "scope_id", "key", "value", "size", "version", "deleted", "updated_at")
_ROW = and_(_c.scope == bindparam("p_scope"), _c.scope_id == bindparam("p_scope_id"))
_READ = select(_c.value, _c.version, _c.deleted).where(_ROW, _c.key == bindparam("p_key"))
_SIZE = select(func.coalesce(func.sum(_c.size), 0)).where(
    _ROW, _c.key.not_in(bindparam("p_keys", expanding=True))
)
_LOCK = (
    select(_c.key, _c.value, _c.deleted)
    .where(_ROW, _c.key.in_(bindparam("p_keys", expanding=True)))
    .order_by(_c.key)
    .with_for_update()
)
_STATEMENTS: dict[tuple[str, str], Any] = {}  # built once per (dialect, kind)


def _insert(dialect: str) -> Any:
    return pg_insert(state_entries) if dialect == "postgresql" else sqlite_insert(state_entries)


def _typed(name: str, type_: Any, pg: bool) -> Any:
    # PostgreSQL needs the type of parameters in a bare SELECT list; SQLite must not get
    # CAST(... AS JSON), which would turn '5' into the integer 5.
    return cast(bindparam(name, type_=type_), type_) if pg else type_coerce(bindparam(name), type_)


def _overwrite(insert: Any) -> dict[str, Any]:
    """The SET clause of an upsert: take the new row's value, bump the version."""
    return {
        "value": insert.excluded.value,
        "size": insert.excluded.size,
        "deleted": insert.excluded.deleted,
        "updated_at": insert.excluded.updated_at,
        "version": _c.version + 1,
    }


def _fits(pg: bool) -> Any:
    """SQL condition: the scope's other values plus this one fit in ``b_limit`` bytes."""
    others = (
        select(func.coalesce(func.sum(_c.size), 0))
        .where(
            _c.scope == _typed("b_scope", String(), pg),
            _c.scope_id == _typed("b_scope_id", String(), pg),
            _c.key != _typed("b_key", String(), pg),
        )
        .scalar_subquery()
    )
    return others + _typed("b_size", BigInteger(), pg) <= _typed("b_limit", BigInteger(), pg)


def _writable(pg: bool) -> Any:
    """SQL condition: the writing session (``b_guard``) is open; true when there is none."""
    guard = _typed("b_guard", String(), pg)
    return guard.is_(None) | exists().where(
        sessions.c.id == guard, sessions.c.status.in_(_WRITABLE)
    )


def _statement(dialect: str, kind: str) -> Any:
    stmt = _STATEMENTS.get((dialect, kind))
    if stmt is not None:
        return stmt
    pg = dialect == "postgresql"
    if kind == "cas":
        stmt = (
            update(state_entries)
            .where(_ROW, _c.key == bindparam("p_key"), _c.version == bindparam("expected"))
            .where(_fits(pg), _writable(pg))
            .values(
                value=bindparam("b_value", type_=_c.value.type),
                size=bindparam("b_size"),
                deleted=bindparam("b_deleted"),
                updated_at=bindparam("b_updated_at", type_=_c.updated_at.type),
                version=_c.version + 1,
            )
            .returning(_c.version)
        )
    else:  # "upsert" (write whatever is there) or "create" (only if the key has no row)
        types = [state_entries.c[col].type for col in _COLUMNS]
        values = (_typed(f"b_{n}", t, pg) for n, t in zip(_COLUMNS, types, strict=True))
        source = select(*values).where(_fits(pg), _writable(pg))
        insert = _insert(dialect).from_select(list(_COLUMNS), source)
        if kind == "create":  # no row yet, or a version-0 tombstone lock_rows left behind
            stmt = insert.on_conflict_do_update(
                index_elements=[_c.scope, _c.scope_id, _c.key],
                set_=_overwrite(insert),
                where=_c.version == 0,
            ).returning(_c.version)
        else:
            stmt = insert.on_conflict_do_update(
                index_elements=[_c.scope, _c.scope_id, _c.key], set_=_overwrite(insert)
            ).returning(_c.version)
    _STATEMENTS[(dialect, kind)] = stmt
    return stmt


def _params(
    scope: str, scope_id: str, key: str, value: Any, size: int, limit: int, guard: str | None
) -> dict[str, Any]:
    deleted = value is MISSING
    return {
        "b_scope": scope,
        "b_scope_id": scope_id,
        "b_key": key,
        "b_value": None if deleted else value,
        "b_size": 0 if deleted else size,
        "b_version": 1,
        "b_deleted": deleted,
        "b_updated_at": utcnow(),
        "b_limit": 2**62 if deleted else limit,
        "b_guard": guard,
    }


def read_row(conn: Connection, scope: str, scope_id: str, key: str) -> tuple[Any, int]:
    row = conn.execute(_READ, {"p_scope": scope, "p_scope_id": scope_id, "p_key": key}).first()
    if row is None:
        return MISSING, 0
    return (MISSING if row.deleted else row.value), int(row.version)


def read_scope(conn: Connection, scope: str, scope_id: str) -> dict[str, tuple[Any, int]]:
    rows = conn.execute(
        select(_c.key, _c.value, _c.version)
        .where(_c.scope == scope, _c.scope_id == scope_id, _c.deleted.is_(False))
        .order_by(_c.key)
    )
    return {row.key: (row.value, int(row.version)) for row in rows}


def lock_rows(conn: Connection, scope: str, scope_id: str, keys: Iterable[str]) -> dict[str, Any]:
    """Current values (MISSING if none) of ``keys``, locked until the transaction ends.

    Missing rows are created as tombstones first, so that the lock covers them too
    (SQLite needs no row locks: its write transactions are exclusive).
    """
    keys = sorted(set(keys))
    if not keys:
        return {}
    params = {"p_scope": scope, "p_scope_id": scope_id, "p_keys": keys}
    found = {row.key: row for row in conn.execute(_LOCK, params)}
    missing = [k for k in keys if k not in found]
    if missing:
        now = utcnow()
        rows = [
            {
                "scope": scope,
                "scope_id": scope_id,
                "key": k,
                "value": None,
                "size": 0,
                "version": 0,
                "deleted": True,
                "updated_at": now,
            }
            for k in missing
        ]
        conn.execute(_insert(conn.dialect.name).on_conflict_do_nothing(), rows)
        found = {row.key: row for row in conn.execute(_LOCK, params)}
    return {k: (MISSING if row.deleted else row.value) for k, row in found.items()}


def write_row(
    conn: Connection,
    scope: str,
    scope_id: str,
    key: str,
    value: Any,
    size: int,
    limit: int = 2**62,
    guard: str | None = None,
) -> int | None:
    """Set (``value=MISSING``: delete) a key whatever its version; returns the new one.

    None (nothing written) when the scope would exceed ``limit`` or the ``guard``
    session is not open.
    """
    params = _params(scope, scope_id, key, value, size, limit, guard)
    version = conn.execute(_statement(conn.dialect.name, "upsert"), params).scalar()
    return None if version is None else int(version)


def cas_row(
    conn: Connection,
    scope: str,
    scope_id: str,
    key: str,
    value: Any,
    size: int,
    expected: int,
    limit: int,
    guard: str | None,
) -> int | None:
    """Like :func:`write_row`, if the key is still at version ``expected``; else None."""
    params = _params(scope, scope_id, key, value, size, limit, guard)
    if expected == 0:
        created = conn.execute(_statement(conn.dialect.name, "create"), params).scalar()
        return None if created is None else int(created)
    params.update(p_scope=scope, p_scope_id=scope_id, p_key=key, expected=expected)
    version = conn.execute(_statement(conn.dialect.name, "cas"), params).scalar()
    return None if version is None else int(version)


class StateSQL:
    """Session state rows: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

    def state_read(self, scope: str, scope_id: str, key: str) -> tuple[Any, int]:
        with self.engines.read() as conn:
            return read_row(conn, scope, scope_id, key)

    def state_scope(self, scope: str, scope_id: str) -> dict[str, tuple[Any, int]]:
        with self.engines.read() as conn:
            return read_scope(conn, scope, scope_id)

    def state_write(
        self, session_id: str, writes: Sequence[StateWrite], limit: int
    ) -> dict[str, int]:
        versions: dict[str, int] = {}
        conflicts: list[str] = []
        ordered = sorted(writes, key=lambda w: (w.scope, w.scope_id, w.key))  # one lock order
        with self.engines.write() as conn:
            for w in ordered:
                if w.expected is None:
                    got = write_row(
                        conn, w.scope, w.scope_id, w.key, w.value, w.size, limit, session_id
                    )
                else:
                    got = cas_row(
                        conn,
                        w.scope,
                        w.scope_id,
                        w.key,
                        w.value,
                        w.size,
                        w.expected,
                        limit,
                        session_id,
                    )
                if got is not None:
                    versions[w.key] = got
                    continue
                self._refused(conn, session_id)
                if w.expected is not None and read_row(conn, w.scope, w.scope_id, w.key)[1] != (
                    w.expected
                ):
                    conflicts.append(w.key)
                else:
                    raise _size_error(conn, w.scope, w.scope_id, w.key, w.size, limit)
            if conflicts:
                raise StateConflict(
                    f"state key(s) {', '.join(map(repr, sorted(conflicts)))} changed since this "
                    "task or client read them; nothing was written. Read them again with get() "
                    "and retry, or use increment()/append() for counters and lists",
                    sorted(conflicts),
                )
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
        with self.engines.write() as conn:
            self._refused(conn, session_id)
            current = lock_rows(conn, scope, scope_id, [key])[key]
            value = apply_op(current, op)
            _, size = check_value(key, value, value_limit)
            if write_row(conn, scope, scope_id, key, value, size, scope_limit) is None:
                raise _size_error(conn, scope, scope_id, key, size, scope_limit)
        return value

    def state_clear(self, session_id: str) -> None:
        with self.engines.write() as conn:
            self._refused(conn, session_id)
            conn.execute(
                update(state_entries)
                .where(_c.scope == "session", _c.scope_id == session_id, _c.deleted.is_(False))
                .values(
                    value=None, size=0, deleted=True, version=_c.version + 1, updated_at=utcnow()
                )
            )

    @staticmethod
    def _refused(conn: Connection, session_id: str) -> None:
        """Raise the session's ended (or not-found) error unless it may be written."""
        row = conn.execute(
            select(sessions.c.status, sessions.c.reason).where(sessions.c.id == session_id)
        ).first()
        if row is None:
            raise SessionNotFound(
                f"no session {session_id!r} in the store: its state cannot be written"
            )
        if row.status not in _WRITABLE:
            raise ended_error(session_id, row.status, row.reason)


def _size_error(
    conn: Connection, scope: str, scope_id: str, key: str, size: int, limit: int
) -> StateValueError:
    others = conn.execute(
        _SIZE, {"p_scope": scope, "p_scope_id": scope_id, "p_keys": [key]}
    ).scalar_one()
    return StateValueError(
        f"state key {key!r}: the {scope} state would take {int(others) + size} bytes, more than "
        f"sessionflow_state_max_session_bytes ({limit}); delete keys you no longer "
        "need or store references instead; nothing was written",
        key,
    )

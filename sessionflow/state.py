"""Session state: a durable key/value store shared by a session's tasks.

``Session.state`` (client) and ``current_session().state`` (in a task) return a
:class:`State`. Keys are scoped by prefix:

- a plain key belongs to the session;
- ``user:`` keys are shared by every session of the session's ``user_id``;
- ``app:`` keys are shared by every session;
- ``temp:`` keys live in memory for the running task (or this client object) only.

Every stored key is one row ``(scope, scope_id, key)`` with an integer version
that grows on every change, deletes included (a deleted key keeps a tombstone,
so a version is never reused). Each write commits before the call returns.
``get`` remembers the version it read; a later ``set``/``delete`` of that key is a
compare-and-set against it and raises :class:`StateConflict` if someone changed
the key in between (the key is then forgotten: ``get`` it again and retry). A key
never read is written blindly. ``increment`` and ``append`` are atomic
read-modify-writes under the row lock, so concurrent callers never lose updates.

Inside a parallel branch (a member of a group or chord header dispatched through
a session) plain keys read a snapshot taken at dispatch and writes go to the
branch's private copy; see :mod:`sessionflow.branches`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    String,
    and_,
    bindparam,
    cast,
    func,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from .errors import InvalidArgument, StateConflict, StateValueError
from .merge import APPEND, DELETE, INCREMENT, MISSING, SET, Op, apply_op, check_value, copy_value
from .merge import is_number as _is_number
from .models import sessions, state_entries
from .store import utcnow

if TYPE_CHECKING:
    from .flow import SessionFlow
    from .session import Session

SESSION, USER, APP, TEMP = "session", "user", "app", "temp"
_PREFIXES = {"user:": USER, "app:": APP, "temp:": TEMP}
MAX_KEY_LENGTH = 255
_EXTRA_KEY = "sessionflow.state"


def scope_of(key: Any) -> str:
    """The scope of a state key; raises InvalidArgument for a key that cannot be used."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"state keys are non-empty strings, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"state key {key[:40]!r}… is longer than {MAX_KEY_LENGTH} characters")
    for prefix, scope in _PREFIXES.items():
        if key.startswith(prefix):
            if len(key) == len(prefix):
                raise InvalidArgument(f"state key {key!r} needs a name after the prefix")
            return scope
    return SESSION


# -- rows -----------------------------------------------------------------------


def _insert(conn: Connection) -> Any:
    """An INSERT that supports ON CONFLICT (PostgreSQL and SQLite)."""
    if conn.dialect.name == "postgresql":
        return pg_insert(state_entries)
    return sqlite_insert(state_entries)


_c = state_entries.c
_ROW = and_(_c.scope == bindparam("p_scope"), _c.scope_id == bindparam("p_scope_id"))
_READ = select(_c.value, _c.version, _c.deleted).where(_ROW, _c.key == bindparam("p_key"))
_SIZE = select(func.coalesce(func.sum(_c.size), 0)).where(
    _ROW, _c.key.not_in(bindparam("p_keys", expanding=True))
)


def _overwrite(insert: Any) -> dict[str, Any]:
    """The SET clause of an upsert: take the new row's value, bump the version."""
    return {
        "value": insert.excluded.value,
        "size": insert.excluded.size,
        "deleted": insert.excluded.deleted,
        "updated_at": insert.excluded.updated_at,
        "version": _c.version + 1,
    }


_UPSERTS: dict[str, Any] = {}


def _upsert(conn: Connection) -> Any:
    """INSERT … ON CONFLICT DO UPDATE (version + 1), built once per dialect."""
    name = conn.dialect.name
    stmt = _UPSERTS.get(name)
    if stmt is None:
        insert = _insert(conn)
        stmt = _UPSERTS[name] = insert.on_conflict_do_update(
            index_elements=[_c.scope, _c.scope_id, _c.key], set_=_overwrite(insert)
        ).returning(_c.version)
    return stmt


def read_row(conn: Connection, scope: str, scope_id: str, key: str) -> tuple[Any, int]:
    """(value or MISSING, version; 0 when the key never existed)."""
    row = conn.execute(_READ, {"p_scope": scope, "p_scope_id": scope_id, "p_key": key}).first()
    if row is None:
        return MISSING, 0
    return (MISSING if row.deleted else row.value), int(row.version)


def read_scope(conn: Connection, scope: str, scope_id: str) -> dict[str, tuple[Any, int]]:
    """Every present key of a scope: key -> (value, version)."""
    c = state_entries.c
    rows = conn.execute(
        select(c.key, c.value, c.version)
        .where(c.scope == scope, c.scope_id == scope_id, c.deleted.is_(False))
        .order_by(c.key)
    )
    return {row.key: (row.value, int(row.version)) for row in rows}


_LOCK = (
    select(_c.key, _c.value, _c.deleted)
    .where(_ROW, _c.key.in_(bindparam("p_keys", expanding=True)))
    .order_by(_c.key)
    .with_for_update()
)


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
        conn.execute(_insert(conn).on_conflict_do_nothing(), rows)
        found = {row.key: row for row in conn.execute(_LOCK, params)}
    return {k: (MISSING if row.deleted else row.value) for k, row in found.items()}


_COLUMNS = ("scope", "scope_id", "key", "value", "size", "version", "deleted", "updated_at")
_CHECKED: dict[str, Any] = {}
_CAS: dict[str, Any] = {}


def _params(
    scope: str, scope_id: str, key: str, value: Any, size: int, prefix: str = ""
) -> dict[str, Any]:
    deleted = value is MISSING
    return {
        f"{prefix}scope": scope,
        f"{prefix}scope_id": scope_id,
        f"{prefix}key": key,
        f"{prefix}value": None if deleted else value,
        f"{prefix}size": 0 if deleted else size,
        f"{prefix}version": 1,
        f"{prefix}deleted": deleted,
        f"{prefix}updated_at": utcnow(),
    }


def _fits(pg: bool) -> Any:
    """SQL condition: the scope's other values plus this one fit in ``limit`` bytes."""
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


def _typed(name: str, type_: Any, pg: bool) -> Any:
    # PostgreSQL needs the type of parameters in a bare SELECT list; SQLite must not get
    # CAST(... AS JSON), which would turn '5' into the integer 5.
    return cast(bindparam(name, type_=type_), type_) if pg else type_coerce(bindparam(name), type_)


def _checked_upsert(conn: Connection, insert_only: bool = False) -> Any:
    """Like :func:`_upsert`, but only when the scope stays within its size limit.

    ``insert_only``: create the key only if it has no row yet (ON CONFLICT DO NOTHING).
    """
    name = f"{conn.dialect.name}:{insert_only}"
    stmt = _CHECKED.get(name)
    if stmt is None:
        pg = conn.dialect.name == "postgresql"
        types = [state_entries.c[col].type for col in _COLUMNS]
        values = (_typed(f"b_{n}", t, pg) for n, t in zip(_COLUMNS, types, strict=True))
        insert = _insert(conn).from_select(list(_COLUMNS), select(*values).where(_fits(pg)))
        if insert_only:
            stmt = _CHECKED[name] = insert.on_conflict_do_nothing().returning(_c.version)
            return stmt
        stmt = _CHECKED[name] = insert.on_conflict_do_update(
            index_elements=[_c.scope, _c.scope_id, _c.key], set_=_overwrite(insert)
        ).returning(_c.version)
    return stmt


def _cas_update(conn: Connection) -> Any:
    name = conn.dialect.name
    stmt = _CAS.get(name)
    if stmt is None:
        pg = name == "postgresql"
        stmt = _CAS[name] = (
            update(state_entries)
            .where(_ROW, _c.key == bindparam("p_key"), _c.version == bindparam("expected"))
            .where(_fits(pg))
            .values(
                value=bindparam("b_value", type_=_c.value.type),
                size=bindparam("b_size"),
                deleted=bindparam("b_deleted"),
                updated_at=bindparam("b_updated_at", type_=_c.updated_at.type),
                version=_c.version + 1,
            )
            .returning(_c.version)
        )
    return stmt


def write_row(
    conn: Connection,
    scope: str,
    scope_id: str,
    key: str,
    value: Any,
    size: int,
    limit: int | None = None,
) -> int | None:
    """Set (``value=MISSING``: delete) a key unconditionally; returns its new version.

    With a ``limit`` a set that would make the scope larger than ``limit`` bytes
    writes nothing and returns None.
    """
    if limit is None or value is MISSING:
        params = _params(scope, scope_id, key, value, size)
        return int(conn.execute(_upsert(conn), params).scalar_one())
    params = _params(scope, scope_id, key, value, size, "b_")
    params["b_limit"] = limit
    version = conn.execute(_checked_upsert(conn), params).scalar()
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
) -> int | None:
    """Like :func:`write_row` if the key is still at version ``expected``; else None."""
    params = _params(scope, scope_id, key, value, size, "b_")
    params["b_limit"] = limit if value is not MISSING else 2**62
    if expected == 0:
        inserted = conn.execute(_checked_upsert(conn, insert_only=True), params).scalar()
        return None if inserted is None else int(inserted)
    cas_params = {
        **params,
        "p_scope": scope,
        "p_scope_id": scope_id,
        "p_key": key,
        "expected": expected,
    }
    version = conn.execute(_cas_update(conn), cas_params).scalar()
    return None if version is None else int(version)


def size_error(
    conn: Connection, scope: str, scope_id: str, key: str, size: int, limit: int
) -> StateValueError:
    """The error for a write refused because the scope would exceed ``limit`` bytes."""
    others = conn.execute(
        _SIZE, {"p_scope": scope, "p_scope_id": scope_id, "p_keys": [key]}
    ).scalar_one()
    return StateValueError(
        f"state key {key!r}: the {scope} state would take {int(others) + size} bytes, more than "
        f"sessionflow_state_max_session_bytes ({limit}); delete keys you no longer "
        "need or store references instead; nothing was written",
        key,
    )


# -- the public object ------------------------------------------------------------


@dataclass
class BranchView:
    """The private copy a parallel branch works on: the snapshot plus its own operations."""

    group_id: str
    values: dict[str, Any]
    ops: list[Op] = field(default_factory=list)

    def apply(self, op: Op) -> Any:
        value = apply_op(self.values.get(op[1], MISSING), op)
        if value is MISSING:
            self.values.pop(op[1], None)
        else:
            self.values[op[1]] = value
        self.ops.append(op)
        return value


class State:
    """Key/value state of one session; the same type on the client and in tasks.

    Thread-safe. Values are JSON values and come back as private copies.
    """

    def __init__(
        self, flow: SessionFlow, session_id: str, branch: BranchView | None = None
    ) -> None:
        self._flow = flow
        self._session_id = session_id
        self._branch = branch
        self._temp: dict[str, Any] = {}
        self._versions: dict[str, int] = {}
        self._user_id: str | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<State of session {self._session_id}>"

    # -- reading --------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``; remembers the version read (see set)."""
        value = self._get(key)
        return default if value is MISSING else value

    def __getitem__(self, key: str) -> Any:
        value = self._get(key)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._get(key, track=False) is not MISSING

    def keys(self) -> list[str]:
        """Every key this session sees: its own, its user's, the app's and temp keys."""
        return sorted(self.to_dict())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """A copy of every key this session sees and its value."""
        out: dict[str, Any] = {}
        with self._flow.store._read() as conn:
            if self._branch is None:
                out.update(
                    {k: v for k, (v, _) in read_scope(conn, SESSION, self._session_id).items()}
                )
            user_id = self._user_id_or_none()
            if user_id is not None:
                out.update({k: v for k, (v, _) in read_scope(conn, USER, user_id).items()})
            out.update({k: v for k, (v, _) in read_scope(conn, APP, "").items()})
        with self._lock:
            if self._branch is not None:
                out.update(copy_value(self._branch.values))
            out.update(copy_value(self._temp))
        return dict(sorted(out.items()))

    def _get(self, key: str, track: bool = True) -> Any:
        scope = scope_of(key)
        with self._lock:
            if scope == TEMP:
                return copy_value(self._temp.get(key, MISSING))
            if scope == SESSION and self._branch is not None:
                return copy_value(self._branch.values.get(key, MISSING))
        scope_id = self._scope_id(scope, key)
        with self._flow.store._read() as conn:
            value, version = read_row(conn, scope, scope_id, key)
        if track:
            with self._lock:
                self._versions[key] = version
        return value

    # -- writing ------------------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; durable on return.

        Raises StateConflict if ``key`` changed since this object last read it.
        """
        scope = scope_of(key)
        if scope == TEMP or (scope == SESSION and self._branch is not None):
            self.update({key: value})
            return
        stored = check_value(key, value, self._flow.config.state_max_value_bytes)
        self._store({(scope, self._scope_id(scope, key)): {key: stored}})

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def update(self, mapping: Mapping[str, Any]) -> None:
        """Set several keys in one transaction: all of them, or (on an error) none."""
        if not isinstance(mapping, Mapping):
            raise InvalidArgument(f"update() takes a mapping of key -> value, got {mapping!r}")
        writes = {}
        limit = self._flow.config.state_max_value_bytes
        for key, value in mapping.items():
            scope_of(key)
            writes[key] = check_value(key, value, limit)
        self._write(writes)

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is missing); compare-and-set like ``set``."""
        scope_of(key)
        self._write({key: (MISSING, 0)})

    def __delitem__(self, key: str) -> None:
        if self._get(key, track=False) is MISSING:
            raise KeyError(key)
        self.delete(key)

    def clear(self) -> None:
        """Delete every key of the session and every temp key (user/app keys stay)."""
        with self._lock:
            self._temp.clear()
            if self._branch is not None:
                for key in sorted(self._branch.values):
                    self._branch.apply((DELETE, key, None))
                return
        with self._flow.store._write() as conn:
            c = state_entries.c
            conn.execute(
                update(state_entries)
                .where(c.scope == SESSION, c.scope_id == self._session_id, c.deleted.is_(False))
                .values(
                    value=None, size=0, deleted=True, version=c.version + 1, updated_at=utcnow()
                )
            )

    def increment(self, key: str, by: int | float = 1) -> int | float:
        """Atomically add ``by`` to a number (missing counts as 0); returns the new value."""
        if not _is_number(by):
            raise InvalidArgument(f"increment(by=...) must be an int or float, got {by!r}")
        check_value(key, by)
        return self._atomic((INCREMENT, key, by))  # type: ignore[no-any-return]

    def append(self, key: str, item: Any) -> int:
        """Atomically append ``item`` to a list (missing counts as []); returns the new length."""
        item, _ = check_value(key, item, self._flow.config.state_max_value_bytes)
        return len(self._atomic((APPEND, key, item)))

    # -- internals -------------------------------------------------------------------

    def _scope_id(self, scope: str, key: str) -> str:
        if scope == SESSION:
            return self._session_id
        if scope == APP:
            return ""
        user_id = self._user_id_or_none()
        if user_id is None:
            raise InvalidArgument(
                f"state key {key!r} belongs to the session's user, but session "
                f"{self._session_id} was created without user_id: pass "
                "create_session(user_id=...) to use user: keys"
            )
        return user_id

    def _user_id_or_none(self) -> str | None:
        if self._user_id is None:
            with self._flow.store._read() as conn:
                self._user_id = conn.execute(
                    select(sessions.c.user_id).where(sessions.c.id == self._session_id)
                ).scalar()
        return self._user_id

    def _write(self, writes: Mapping[str, tuple[Any, int]]) -> None:
        stored: dict[tuple[str, str], dict[str, tuple[Any, int]]] = {}
        with self._lock:
            for key, (value, size) in writes.items():
                scope = scope_of(key)
                if scope == TEMP:
                    continue
                if scope == SESSION and self._branch is not None:
                    continue
                stored.setdefault((scope, self._scope_id(scope, key)), {})[key] = (value, size)
        if stored:
            self._store(stored)
        with self._lock:
            for key, (value, _) in writes.items():
                scope = scope_of(key)
                if scope == TEMP:
                    if value is MISSING:
                        self._temp.pop(key, None)
                    else:
                        self._temp[key] = value
                elif scope == SESSION and self._branch is not None:
                    self._branch.apply(
                        (DELETE, key, None) if value is MISSING else (SET, key, value)
                    )

    def _store(self, stored: Mapping[tuple[str, str], Mapping[str, tuple[Any, int]]]) -> None:
        limit = self._flow.config.state_max_session_bytes
        with self._lock:
            expected = {k: self._versions.get(k) for group in stored.values() for k in group}
        versions: dict[str, int] = {}
        conflicts: list[str] = []
        with self._flow.store._write() as conn:
            for (scope, scope_id), entries in sorted(stored.items()):  # one lock order
                for key, (value, size) in sorted(entries.items()):
                    want = expected[key]
                    if want is None:
                        got = write_row(conn, scope, scope_id, key, value, size, limit)
                    else:
                        got = cas_row(conn, scope, scope_id, key, value, size, want, limit)
                    if got is not None:
                        versions[key] = got
                    elif want is not None and read_row(conn, scope, scope_id, key)[1] != want:
                        conflicts.append(key)
                    else:
                        raise size_error(conn, scope, scope_id, key, size, limit)
            if conflicts:
                with self._lock:
                    for key in conflicts:
                        self._versions.pop(key, None)
                raise StateConflict(
                    f"state key(s) {', '.join(map(repr, sorted(conflicts)))} changed since this "
                    "task or client read them; nothing was written. Read them again with get() "
                    "and retry, or use increment()/append() for counters and lists",
                    sorted(conflicts),
                )
        with self._lock:
            for key, version in versions.items():
                if key in self._versions:
                    self._versions[key] = version

    def _atomic(self, op: Op) -> Any:
        key = op[1]
        scope = scope_of(key)
        with self._lock:
            if scope == TEMP:
                value = apply_op(self._temp.get(key, MISSING), op)
                self._temp[key] = value
                return copy_value(value)
            if scope == SESSION and self._branch is not None:
                return copy_value(self._branch.apply(op))
        scope_id = self._scope_id(scope, key)
        config = self._flow.config
        with self._flow.store._write() as conn:
            current = lock_rows(conn, scope, scope_id, [key])[key]
            value = apply_op(current, op)
            _, size = check_value(key, value, config.state_max_value_bytes)
            limit = config.state_max_session_bytes
            if write_row(conn, scope, scope_id, key, value, size, limit) is None:
                raise size_error(conn, scope, scope_id, key, size, limit)
        return value


def state_for(session: Session) -> State:
    """The State of ``session``: the running task's own object inside a task."""
    from .runtime import current_run

    run = current_run()
    if run is not None and run.session_id == session.id:
        state = run.extra.get(_EXTRA_KEY)
        if state is None:
            state = run.extra[_EXTRA_KEY] = State(session._flow, session.id)
        return state
    cached = session.__dict__.get(_EXTRA_KEY)
    if cached is None:
        cached = session.__dict__[_EXTRA_KEY] = State(session._flow, session.id)
    return cached

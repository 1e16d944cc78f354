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
``get`` remembers the version it read, per thread and per asyncio task; a later
``set``/``delete`` of that key by the same thread or task is a compare-and-set
against it and raises :class:`StateConflict` if someone (another thread sharing
this object included) changed the key in between (the key is then forgotten: ``get``
it again and retry). A key this thread or task never read is written blindly.
``increment`` and ``append`` are atomic read-modify-writes under the row lock, so
concurrent callers never lose updates.

Inside a parallel branch (a member of a group or chord header dispatched through
a session) plain keys read a snapshot (taken at dispatch, or for a group that
starts later when one of its tasks first uses the state) and writes go to the
branch's private copy; see :mod:`sessionflow.branches`.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument, StateConflict
from .limits import MAX_ID
from .merge import APPEND, DELETE, INCREMENT, MISSING, SET, Op, apply_op, check_value, copy_value
from .merge import is_number as _is_number
from .records import StateWrite

if TYPE_CHECKING:
    from .flow import SessionFlow
    from .session import Session

SESSION, USER, APP, TEMP = "session", "user", "app", "temp"
_PREFIXES = {"user:": USER, "app:": APP, "temp:": TEMP}
MAX_KEY_LENGTH = MAX_ID
_EXTRA_KEY = "sessionflow.state"


def scope_of(key: Any) -> str:
    """The scope of a state key; raises InvalidArgument for a key that cannot be used."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"state keys are non-empty strings, got {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"state key {key[:40]!r}… is longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in key:
        raise InvalidArgument("state keys must not contain NUL characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("state keys must be valid Unicode (no lone surrogates)") from None
    for prefix, scope in _PREFIXES.items():
        if key.startswith(prefix):
            if len(key) == len(prefix):
                raise InvalidArgument(f"state key {key!r} needs a name after the prefix")
            return scope
    return SESSION


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

    Thread-safe: threads and asyncio tasks sharing one object (a web app's cached
    ``Session.state``) each compare-and-set against the versions they read themselves.
    Values are JSON values and come back as private copies.
    """

    def __init__(
        self, flow: SessionFlow, session_id: str, branch: BranchView | None = None
    ) -> None:
        self._flow = flow
        self._session_id = session_id
        self._branch = branch
        self._temp: dict[str, Any] = {}
        self._reads = threading.local()  # the versions get() read: see _read_versions
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
        store = self._flow.store
        if self._branch is None:
            out.update({k: v for k, (v, _) in store.state_scope(SESSION, self._session_id).items()})
        user_id = self._user_id_or_none()
        if user_id is not None:
            out.update({k: v for k, (v, _) in store.state_scope(USER, user_id).items()})
        out.update({k: v for k, (v, _) in store.state_scope(APP, "").items()})
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
        value, version = self._flow.store.state_read(scope, scope_id, key)
        if track:
            self._read_versions()[key] = version
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
        self._flow.store.state_clear(self._session_id)

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
            self._user_id = self._flow.store.session_user(self._session_id)
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

    def _read_versions(self) -> dict[str, int]:
        """The versions this thread, or the asyncio task running in it, read.

        One table per caller, so one caller's write never moves the version another
        caller's compare-and-set runs against (that lost the other caller's update).
        Only its own thread touches a table: no lock needed.
        """
        reads = self._reads
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop runs in this thread
            task = None
        if task is None:
            if not hasattr(reads, "versions"):
                reads.versions = {}
            return reads.versions  # type: ignore[no-any-return]
        if not hasattr(reads, "by_task"):
            reads.by_task = weakref.WeakKeyDictionary()  # a finished task's table goes
        return reads.by_task.setdefault(task, {})  # type: ignore[no-any-return]

    def _store(self, stored: Mapping[tuple[str, str], Mapping[str, tuple[Any, int]]]) -> None:
        read = self._read_versions()
        writes = [
            StateWrite(scope, scope_id, key, value, size, read.get(key))
            for (scope, scope_id), entries in stored.items()
            for key, (value, size) in entries.items()
        ]
        try:
            versions = self._flow.store.state_write(
                self._session_id, writes, self._flow.config.state_max_session_bytes
            )
        except StateConflict as exc:
            for key in exc.keys:
                read.pop(key, None)
            raise
        for key, version in versions.items():
            if key in read:
                read[key] = version

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
        config = self._flow.config
        return self._flow.store.state_atomic(
            self._session_id,
            scope,
            self._scope_id(scope, key),
            op,
            config.state_max_value_bytes,
            config.state_max_session_bytes,
        )


def state_for(session: Session) -> State:
    """The State of ``session``: the running task's own object inside a task."""
    from .runtime import current_run

    run = current_run()
    if run is not None and run.session_id == session.id:
        state = run.extra.get(_EXTRA_KEY)
        if state is None:
            from .branches import member_state

            state = run.extra[_EXTRA_KEY] = member_state(session._flow, run)
        return state
    cached = session.__dict__.get(_EXTRA_KEY)
    if cached is None:
        cached = session.__dict__[_EXTRA_KEY] = State(session._flow, session.id)
    return cached

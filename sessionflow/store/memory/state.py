"""Session state in memory: versioned entries, compare-and-set, size limits, atomic
operations. A deleted key stays as a tombstone that keeps its version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...enums import SessionStatus
from ...errors import SessionNotFound, StateConflict, StateValueError, ended_error
from ...merge import MISSING, apply_op, check_value, copy_value
from ...records import StateWrite
from ._data import Entry, MemoryBase, ScopeKey, make_entry

_WRITABLE = (SessionStatus.OPEN, SessionStatus.PENDING)
_NO_LIMIT = 2**62


class StateMemory(MemoryBase):
    """Session state: a part of :class:`~sessionflow.store.memory.MemoryStore`."""

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
            staged: dict[ScopeKey, dict[str, Entry]] = {}
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
                        rows[w.key] = make_entry(w.value, size, have + 1)
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
                    rows[key] = make_entry(MISSING, 0, row.version + 1)

    def _writable(self, session_id: str) -> None:
        row = self._sessions.get(session_id)
        if row is None:
            raise SessionNotFound(
                f"no session {session_id!r} in the store: its state cannot be written"
            )
        if row.status not in _WRITABLE:
            raise ended_error(session_id, row.status.value, row.reason)


def _others(rows: dict[str, Entry], key: str) -> int:
    return sum(e.size for k, e in rows.items() if k != key)


def _size_error(scope: str, key: str, total: int, limit: int) -> StateValueError:
    return StateValueError(
        f"state key {key!r}: the {scope} state would take {total} bytes, more than "
        f"sessionflow_state_max_session_bytes ({limit}); delete keys you no longer "
        "need or store references instead; nothing was written",
        key,
    )

"""Pure rules of session state: JSON values, operations, reducers, branch merging.

Nothing here touches a database, so the same functions drive the live store,
the private copy of a parallel branch, the merge, and the tests' reference model.

A branch records what it did as ordered operations; the merge replays every
member's operations in *member order* onto the live values, so the outcome
never depends on which member finished first. Sets and deletes replace the
value (or go through the key's reducer), increments add their delta and
appends add their item: atomic operations merge as operations, not as values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from .errors import StateConflict, StateValueError

SET, DELETE, INCREMENT, APPEND = "set", "delete", "increment", "append"
OpKind = Literal["set", "delete", "increment", "append"]
#: One operation: (kind, key, argument); the argument of a delete is None.
Op = tuple[str, str, Any]
Reducer = Callable[[Any, Any], Any]
MAX_DEPTH = 64  # nesting of a value: deeper structures are refused, never recursed into


class _Missing:
    """The value of a key that has none (never set, or deleted)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


# -- values --------------------------------------------------------------


def check_value(key: str, value: Any, max_bytes: int | None = None) -> tuple[Any, int]:
    """A private deep copy of a JSON value and its encoded size; raises StateValueError.

    Only None, bool, int, float (finite), str, lists and dicts with str keys are
    accepted; tuples, sets, bytes, dates and objects are refused, never coerced.
    """
    bad = first_bad(value)
    if isinstance(bad, _TooDeep):
        raise StateValueError(
            f"state key {key!r}: the value is nested more than {MAX_DEPTH} levels deep; "
            "nothing was written",
            key,
        )
    if isinstance(bad, str):
        raise StateValueError(
            f"state key {key!r}: a string in the value is not valid Unicode (a lone "
            "surrogate); nothing was written",
            key,
        )
    if bad is not None:
        raise StateValueError(
            f"state key {key!r}: {type(bad).__name__} is not a JSON value "
            "(use None, bool, int, float, str, lists and dicts with str keys); nothing was written",
            key,
        )
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    size = len(text.encode())
    if max_bytes is not None and size > max_bytes:
        raise StateValueError(
            f"state key {key!r}: the value takes {size} bytes as JSON, more than "
            f"sessionflow_state_max_value_bytes ({max_bytes}); store a reference "
            "(a path or id) instead; nothing was written",
            key,
        )
    return json.loads(text), size


def first_bad(value: Any) -> Any:
    """The first part of ``value`` that is not storable JSON (None if all is), without
    recursion: too deep a structure is reported as itself."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, (bool, int)):
            continue
        if isinstance(item, str):
            if not _encodable(item):
                return item
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return item
            continue
        if depth > MAX_DEPTH:
            return _TooDeep()
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            for k, child in item.items():
                if not isinstance(k, str) or not _encodable(k):
                    return k
                stack.append((child, depth + 1))
        else:
            return item
    return None


class _TooDeep:
    """Stands for a structure nested more than MAX_DEPTH levels."""

    def __repr__(self) -> str:
        return f"a structure nested more than {MAX_DEPTH} levels"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database can store it
        return False
    return True


def copy_value(value: Any) -> Any:
    """A deep copy of a JSON value (callers never share mutable state)."""
    if isinstance(value, (list, dict)):
        return json.loads(json.dumps(value))
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- operations ------------------------------------------------------------


def apply_op(current: Any, op: Op, reducer: Reducer | None = None) -> Any:
    """The value of ``op``'s key after applying ``op`` to ``current`` (or MISSING).

    With a ``reducer`` a set combines: ``reducer(current, value)``.
    Raises StateValueError when an increment or append does not fit the value.
    """
    kind, key, arg = op
    if kind == SET:
        if reducer is None:
            return copy_value(arg)
        return reducer(None if current is MISSING else copy_value(current), copy_value(arg))
    if kind == DELETE:
        return MISSING
    if kind == INCREMENT:
        base = 0 if current is MISSING or current is None else current
        if not is_number(base):
            raise StateValueError(
                f"cannot increment state key {key!r}: it holds {type(base).__name__}, not a number",
                key,
            )
        total = base + arg
        if isinstance(total, float) and not math.isfinite(total):
            raise StateValueError(
                f"cannot increment state key {key!r} by {arg!r}: the sum {total} is not a "
                "finite number; nothing was written",
                key,
            )
        return total
    if kind == APPEND:
        base = [] if current is MISSING or current is None else current
        if not isinstance(base, list):
            raise StateValueError(
                f"cannot append to state key {key!r}: it holds {type(base).__name__}, not a list",
                key,
            )
        return [*base, copy_value(arg)]
    raise ValueError(f"unknown state operation {kind!r}")


def replay(values: Mapping[str, Any], ops: Iterable[Op]) -> dict[str, Any]:
    """``values`` (key -> value) after ``ops`` in order, without reducers; MISSING drops."""
    out = dict(values)
    for op in ops:
        out[op[1]] = apply_op(out.get(op[1], MISSING), op)
    return {k: v for k, v in out.items() if v is not MISSING}


# -- reducers ----------------------------------------------------------------


def _append(current: Any, incoming: Any) -> Any:
    return [
        *(current if isinstance(current, list) else [] if current is None else [current]),
        incoming,
    ]


def _sum(current: Any, incoming: Any) -> Any:
    return incoming if current is None else current + incoming


def _max(current: Any, incoming: Any) -> Any:
    return incoming if current is None else max(current, incoming)


def _min(current: Any, incoming: Any) -> Any:
    return incoming if current is None else min(current, incoming)


def _union(current: Any, incoming: Any) -> Any:
    out = list(current or [])
    for item in incoming if isinstance(incoming, list) else [incoming]:
        if item not in out:
            out.append(item)
    return out


def _merge(current: Any, incoming: Any) -> Any:
    return {**(current or {}), **incoming}


#: Built-in reducers, ``fn(current or None, incoming) -> merged``.
BUILTIN_REDUCERS: dict[str, Reducer] = {
    "append": _append,
    "sum": _sum,
    "max": _max,
    "min": _min,
    "union": _union,
    "merge": _merge,
}


def resolve_reducers(
    names: Mapping[str, str] | None, registered: Mapping[str, Reducer]
) -> dict[str, Reducer]:
    """Reducer functions by state key, from the names stored with the session."""
    out: dict[str, Reducer] = {}
    for key, name in (names or {}).items():
        fn = BUILTIN_REDUCERS.get(name) or registered.get(name)
        if fn is None:
            from .errors import ConfigurationError

            raise ConfigurationError(
                f"reducer {name!r} (state key {key!r}) is not registered in this process: call "
                "flow.register_reducer(name, function) in the module that creates the Celery "
                "app, so that every worker process has it"
            )
        out[key] = fn
    return out


# -- merging -------------------------------------------------------------------


def merge_branches(
    live: Mapping[str, Any],
    snapshot: Mapping[str, Any],
    logs: Sequence[Sequence[Op]],
    *,
    policy: str = "last_write_wins",
    reducers: Mapping[str, Reducer] | None = None,
) -> dict[str, Any]:
    """New values (MISSING = deleted) of every key the branches touched.

    ``live`` holds the current values of those keys, ``snapshot`` the values the
    branches read at dispatch, ``logs`` each member's operations in member order.
    With ``policy="raise"`` a key is a conflict when a set or delete (without a
    reducer) of one member meets any write of another member to the same key,
    unless all of them set the same value, or when a member set or deleted a key
    whose live value changed since the snapshot. Raises StateConflict listing every
    conflicting key (then nothing should be merged), also when an operation no
    longer fits the merged value (e.g. an increment of a key another member set to
    a string).
    """
    reducers = reducers or {}
    if policy == "raise":
        conflicts = find_conflicts(live, snapshot, logs, reducers)
        if conflicts:
            raise StateConflict(
                f"parallel branches wrote conflicting values to state key(s) "
                f"{', '.join(map(repr, conflicts))} (merge='raise'); none of the branches' "
                "session-state writes were merged. Write distinct keys per branch, "
                "use increment/append, or give the keys a reducer",
                conflicts,
            )
    merged: dict[str, Any] = {}
    bad: list[str] = []
    for log in logs:
        for op in log:
            key = op[1]
            current = merged[key] if key in merged else live.get(key, MISSING)
            try:
                merged[key] = apply_op(current, op, reducers.get(key))
            except StateValueError:
                bad.append(key)
    if bad:
        keys = sorted(set(bad))
        raise StateConflict(
            f"parallel branches left state key(s) {', '.join(map(repr, keys))} with "
            "operations that no longer fit (e.g. increment of a key another branch set to a "
            "string); none of the branches' session-state writes were merged",
            keys,
        )
    return merged


def find_conflicts(
    live: Mapping[str, Any],
    snapshot: Mapping[str, Any],
    logs: Sequence[Sequence[Op]],
    reducers: Mapping[str, Reducer],
) -> list[str]:
    """Keys that ``merge="raise"`` refuses to merge (see :func:`merge_branches`)."""
    writers: dict[str, set[int]] = {}
    atomic: set[str] = set()
    value_writes: dict[str, dict[int, Any]] = {}
    for index, log in enumerate(logs):
        for kind, key, arg in log:
            writers.setdefault(key, set()).add(index)
            if kind in (SET, DELETE) and key not in reducers:
                value_writes.setdefault(key, {})[index] = MISSING if kind == DELETE else arg
            elif kind in (INCREMENT, APPEND):
                atomic.add(key)
    conflicts = []
    for key, by_member in value_writes.items():
        if live.get(key, MISSING) != snapshot.get(key, MISSING):
            conflicts.append(key)
        elif len(writers[key]) > 1:
            values = list(by_member.values())
            same = key not in atomic and all(v == values[0] for v in values)
            if not same:
                conflicts.append(key)
    return sorted(conflicts)

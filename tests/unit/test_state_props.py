"""Property-based tests: branch merging and key scopes against a simple in-memory model."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import group, states
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_state_store import STORES, make_flow, open_session, run_task, scratch_url

from sessionflow import InvalidArgument, SessionFlow, StateConflict
from sessionflow.merge import MISSING, find_conflicts, merge_branches

# Keys are typed so that every operation fits: numbers, lists, anything.
NUM_KEYS, LIST_KEYS, ANY_KEYS = ("n1", "n2"), ("l1",), ("v1", "v2")
small = st.integers(-5, 5)
json_leaf = st.one_of(st.none(), st.booleans(), small, st.text(max_size=3))

op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(NUM_KEYS), small),
    st.tuples(st.just("increment"), st.sampled_from(NUM_KEYS), small),
    st.tuples(st.just("set"), st.sampled_from(LIST_KEYS), st.lists(small, max_size=2)),
    st.tuples(st.just("append"), st.sampled_from(LIST_KEYS), json_leaf),
    st.tuples(st.just("set"), st.sampled_from(ANY_KEYS), json_leaf),
    st.tuples(st.just("delete"), st.sampled_from(NUM_KEYS + LIST_KEYS + ANY_KEYS), st.none()),
)
logs = st.lists(st.lists(op, max_size=4), min_size=1, max_size=4)
initial = st.fixed_dictionaries(
    {},
    optional={
        "n1": small,
        "n2": small,
        "l1": st.lists(small, max_size=2),
        "v1": json_leaf,
        "v2": json_leaf,
    },
)


# -- the reference model ------------------------------------------------------------------


def model_apply(values: dict[str, Any], operation: tuple[str, str, Any]) -> None:
    kind, key, arg = operation
    if kind == "set":
        values[key] = arg
    elif kind == "delete":
        values.pop(key, None)
    elif kind == "increment":
        values[key] = values.get(key, 0) + arg
    else:
        values[key] = [*values.get(key, []), arg]


def model_merge(live: dict[str, Any], member_logs: list[list[Any]]) -> dict[str, Any]:
    """Sequential replay: member 0's operations, then member 1's, ..."""
    out = dict(live)
    for log in member_logs:
        for operation in log:
            model_apply(out, operation)
    return out


def model_conflicts(
    live: dict[str, Any], snapshot: dict[str, Any], member_logs: list[list[Any]]
) -> set[str]:
    out = set()
    keys = {o[1] for log in member_logs for o in log}
    for key in keys:
        touching = [i for i, log in enumerate(member_logs) if any(o[1] == key for o in log)]
        setters = [
            i
            for i in touching
            if any(o[1] == key and o[0] in ("set", "delete") for o in member_logs[i])
        ]
        if not setters:
            continue
        if live.get(key, MISSING) != snapshot.get(key, MISSING):
            out.add(key)
            continue
        if len(touching) < 2:
            continue
        only_sets = all(
            o[0] in ("set", "delete") for i in touching for o in member_logs[i] if o[1] == key
        )
        finals = []
        for i in touching:
            last = [o for o in member_logs[i] if o[1] == key][-1]
            finals.append(MISSING if last[0] == "delete" else last[2])
        if not (only_sets and all(f == finals[0] for f in finals)):
            out.add(key)
    return out


# -- pure merge ---------------------------------------------------------------------------------


@given(initial, logs)
def test_merge_is_member_order_replay(live: dict[str, Any], member_logs: list[list[Any]]) -> None:
    merged = merge_branches(live, live, member_logs)
    expected = model_merge(live, member_logs)
    result = dict(live)
    for key, value in merged.items():
        if value is MISSING:
            result.pop(key, None)
        else:
            result[key] = value
    assert result == expected


@given(initial, initial, logs)
def test_raise_policy_conflicts_match_model(
    live: dict[str, Any], snapshot: dict[str, Any], member_logs: list[list[Any]]
) -> None:
    expected = model_conflicts(live, snapshot, member_logs)
    assert set(find_conflicts(live, snapshot, member_logs, {})) == expected
    if expected:
        with pytest.raises(StateConflict) as info:
            merge_branches(live, snapshot, member_logs, policy="raise")
        assert info.value.keys == sorted(expected)
    else:
        assert merge_branches(live, snapshot, member_logs, policy="raise") == merge_branches(
            live, snapshot, member_logs
        )


@given(st.lists(st.integers(-100, 100), min_size=1, max_size=6))
def test_sum_reducer_adds_every_branch(contributions: list[int]) -> None:
    logs_ = [[("set", "total", c)] for c in contributions]
    merged = merge_branches(
        {"total": 1}, {"total": 1}, logs_, reducers={"total": lambda a, b: (a or 0) + b}
    )
    assert merged["total"] == 1 + sum(contributions)


# -- the real thing: a store, branches finishing in any order -----------------------------------


@pytest.fixture(scope="module", params=STORES)
def flow(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SessionFlow]:
    with scratch_url(request.param, tmp_path_factory.mktemp("props")) as url:
        flow = make_flow(url)
        yield flow
        flow.close()
        flow.app.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=initial, member_logs=logs, outside=st.lists(op, max_size=3), data=st.data())
def test_branches_on_store_match_model_in_any_finish_order(
    flow: SessionFlow,
    start: dict[str, Any],
    member_logs: list[list[Any]],
    outside: list[Any],
    data: st.DataObject,
) -> None:
    s = open_session(flow)
    s.state.update(start)
    a = flow.app.tasks["t.a"]
    ids = [
        child.id for child in s.apply_async(group(a.s(i) for i in range(len(member_logs)))).children
    ]
    live = dict(start)
    for operation in outside:  # writes by others after dispatch: branches do not see them
        _run_outside(s.state, operation)
        model_apply(live, operation)
    order = data.draw(st.permutations(range(len(member_logs))))
    for i in order:

        def body(state: Any, log: list[Any] = member_logs[i]) -> list[Any]:
            seen = []
            mine = dict(start)
            for operation in log:
                _run_outside(state, operation)
                model_apply(mine, operation)
                seen.append((state.to_dict(), dict(mine)))
            return seen

        result, seen = run_task(flow, s, ids[i], body)
        assert result == states.SUCCESS
        for got, expected in seen:  # a branch sees the snapshot plus its own writes
            assert got == expected
    assert s.state.to_dict() == model_merge(live, member_logs)


def _run_outside(state: Any, operation: tuple[str, str, Any]) -> None:
    kind, key, arg = operation
    if kind == "set":
        state.set(key, arg)
    elif kind == "delete":
        state.delete(key)
    elif kind == "increment":
        state.increment(key, arg)
    else:
        state.append(key, arg)


# -- scopes -----------------------------------------------------------------------------------

scope_op = st.tuples(
    st.integers(0, 3),  # which session
    st.sampled_from(["k", "user:k", "app:k", "temp:k"]),
    st.sampled_from(["set", "increment", "delete", "get"]),
    small,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(scope_op, min_size=1, max_size=12))
def test_scope_rules_match_model(flow: SessionFlow, ops: list[Any]) -> None:
    tag = uuid.uuid4().hex[:8]
    users = [f"alice-{tag}", f"alice-{tag}", f"bob-{tag}", None]
    sessions = [open_session(flow, user) for user in users]
    model: dict[tuple[str, str, str], Any] = {}

    def slot(i: int, key: str) -> tuple[str, str, str] | None:
        full = key.replace("k", f"k-{tag}") if key.startswith("app:") else key
        if key.startswith("user:"):
            return None if users[i] is None else ("user", str(users[i]), full)
        if key.startswith("app:"):
            return ("app", "", full)
        if key.startswith("temp:"):
            return ("temp", str(i), full)
        return ("session", sessions[i].id, full)

    versions: dict[tuple[str, str, str], int] = {}  # bumped by every stored write
    read: dict[tuple[int, tuple[str, str, str]], int] = {}  # version each State last saw

    for i, key, kind, arg in ops:
        where = slot(i, key)
        full = key.replace("k", f"k-{tag}") if key.startswith("app:") else key
        state = sessions[i].state
        if where is None:
            with pytest.raises(InvalidArgument):
                _run_outside(state, ("set", full, arg)) if kind != "get" else state.get(full)
            continue
        stored = where[0] != "temp"
        if kind == "get":
            assert state.get(full, MISSING) == model.get(where, MISSING)
            if stored:
                read[i, where] = versions.get(where, 0)
            continue
        if kind in ("set", "delete") and (i, where) in read:
            if read[i, where] != versions.get(where, 0):  # changed since read: refused
                with pytest.raises(StateConflict):
                    _run_outside(state, (kind, full, arg))
                del read[i, where]
                continue
            read[i, where] = versions.get(where, 0) + 1
        if kind == "set":
            state.set(full, arg)
            model[where] = arg
        elif kind == "delete":
            state.delete(full)
            model.pop(where, None)
        else:
            assert state.increment(full, arg) == model.get(where, 0) + arg
            model[where] = model.get(where, 0) + arg
        if stored:
            versions[where] = versions.get(where, 0) + 1
    for i, key in itertools.product(range(4), ["k", "user:k", "app:k", "temp:k"]):
        where = slot(i, key)
        if where is not None:
            full = key.replace("k", f"k-{tag}") if key.startswith("app:") else key
            assert sessions[i].state.get(full, MISSING) == model.get(where, MISSING)

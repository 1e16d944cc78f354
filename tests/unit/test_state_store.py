"""Session state on a real SQLite store, without workers: API, scopes, CAS, branches, history."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, signals, states

from sessionflow import (
    InvalidArgument,
    Session,
    SessionClosed,
    SessionFlow,
    SessionFlowError,
    SessionNotFound,
    StateConflict,
    StateValueError,
)
from sessionflow.branches import BranchMiddleware
from sessionflow.canvas import BRANCH_HEADER
from sessionflow.enums import SessionStatus
from sessionflow.records import NewSession, Run, utcnow
from sessionflow.runtime import TaskRun, set_current_run

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


PG_ADMIN_URL = "postgresql://127.0.0.1:5432/test"
STORES = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=pytest.mark.skipif(
            not postgres_up() and not CI, reason="PostgreSQL is not running here (CI=true: error)"
        ),
    ),
]


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


@contextmanager
def scratch_url(store: str, folder: Path) -> Iterator[str]:
    """A database URL for one test module: a SQLite file or a scratch PostgreSQL database."""
    if store == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
        return
    name = f"sfunit_{uuid.uuid4().hex[:8]}"
    pg_admin(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://127.0.0.1:5432/{name}"
    finally:
        pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_flow(url: str | Path, **conf: Any) -> SessionFlow:
    app = Celery("statetest", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.sessionflow_database_url = url if isinstance(url, str) else f"sqlite:///{url}"
    for key, value in conf.items():
        app.conf[f"sessionflow_{key}"] = value

    @app.task(name="t.a", shared=False)
    def a(*args: Any) -> Any:
        return args

    flow = SessionFlow(app)
    if str(url).startswith("postgresql"):
        flow.store.upgrade()
    return flow


def open_session(flow: SessionFlow, user_id: str | None = None, **options: Any) -> Session:
    """A session opened on a pretend worker (tasks go to the in-memory broker)."""
    new = NewSession(
        id=str(uuid.uuid4()),
        created_at=utcnow(),
        creation_timeout=5.0,
        execution_timeout=600.0,
        user_id=user_id,
        **options,
    )
    flow.store.create_pending(new)
    assert flow.store.admit(new.id, f"w-{new.id[:8]}@test", "q.test") is not None
    return Session(flow, new.id)


#: Message headers of every task published in this process, by task id.
PUBLISHED: dict[str, dict[str, Any]] = {}


@signals.before_task_publish.connect
def _remember_headers(headers: dict[str, Any] | None = None, body: Any = None, **_: Any) -> None:
    if headers and "id" in headers:
        PUBLISHED[headers["id"]] = dict(headers)
    # Later chain steps travel inside the message; a worker publishes them later.
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            options = item.get("options")
            if isinstance(options, dict) and options.get("task_id") and options.get("headers"):
                PUBLISHED.setdefault(options["task_id"], dict(options["headers"]))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def run_task(
    flow: SessionFlow, session: Session, task_id: str, body: Callable[[Any], Any] | None = None
) -> tuple[str, Any]:
    """Run ``body(state)`` as the session task ``task_id``, as a worker would.

    The branch middleware runs around it in this process (as in a pool process),
    and its run is recorded the way the worker's writer records it.
    """
    middleware = next(m for m in flow.middleware if isinstance(m, BranchMiddleware))
    request = PUBLISHED.get(task_id, {})
    run = TaskRun(session.id, task_id, "t.a", "w@test", request, queue="q.test", flow=flow)
    started = utcnow()
    set_current_run(run)
    state, outcome, error = states.SUCCESS, None, None
    try:
        middleware.before_body(run)
        outcome = body(session.state) if body else None
        middleware.after_body(run, outcome)
    except Exception as exc:
        state, outcome, error = states.FAILURE, exc, f"{type(exc).__name__}: {exc}"
    finally:
        set_current_run(None)
    middleware.after_task(run, state)
    flow.store.record_runs(
        [Run(task_id, 0, session.id, "t.a", state, "w@test", started, utcnow(), error)]
    )
    return state, outcome


def group_of(task_id: str) -> str:
    """The branch group a dispatched task belongs to."""
    return str(PUBLISHED[task_id][BRANCH_HEADER][0])


@pytest.fixture(scope="module", params=STORES)
def store_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with scratch_url(request.param, tmp_path_factory.mktemp("state")) as url:
        yield url


@pytest.fixture
def flow(store_url: str) -> Iterator[SessionFlow]:
    flow = make_flow(
        store_url,
        state_max_value_bytes=200,
        state_max_session_bytes=1000,
        history_max_runs=5,
    )
    yield flow
    flow.close()
    flow.app.close()


@pytest.fixture
def s(flow: SessionFlow) -> Session:
    return open_session(flow, user_id="u1")


# -- basic API ---------------------------------------------------------------------------


def test_get_set_items_update_delete_keys(s: Session) -> None:
    st = s.state
    assert st.get("missing") is None and st.get("missing", 7) == 7
    with pytest.raises(KeyError):
        st["missing"]
    st.set("a", {"x": [1, 2.5, None, True, "s"]})
    st["b"] = 2
    st.update({"c": "three", "d": []})
    assert st["a"] == {"x": [1, 2.5, None, True, "s"]} and st["b"] == 2
    assert st.keys() == ["a", "b", "c", "d"] and "c" in st and "zz" not in st
    st.delete("c")
    st.delete("never-there")
    with pytest.raises(KeyError):
        del st["c"]
    del st["d"]
    assert st.to_dict() == {"a": {"x": [1, 2.5, None, True, "s"]}, "b": 2}
    st.clear()
    assert st.to_dict() == {}


def test_values_are_private_copies(s: Session) -> None:
    value = {"items": [1]}
    s.state["v"] = value
    value["items"].append(2)
    got = s.state["v"]
    got["items"].append(3)
    assert s.state["v"] == {"items": [1]}


# Numbers whose JSON text SQLite's NUMERIC affinity (a column declared JSON) used to
# convert on the way in: floats with no fraction came back as ints, ints beyond 64 bits
# as inexact floats.
EXACT = [2.0, -0.0, 1e16, 2**63, -(2**63) - 1, 2**80, 0.1 + 0.2, 2**63 - 1, "5", "2.0"]


@pytest.mark.parametrize("value", EXACT, ids=repr)
def test_a_number_comes_back_exactly_as_written(flow: SessionFlow, s: Session, value: Any) -> None:
    s.state["n"] = value
    for got in (s.state["n"], flow.get_session(s.id).state.to_dict()["n"]):
        assert got == value and type(got) is type(value)
        assert repr(got) == repr(value)  # -0.0 too


@pytest.mark.parametrize("key", ["f", "temp:f"])
def test_an_increment_to_infinity_is_refused(s: Session, key: str) -> None:
    """1e308 + 1e308 was stored as inf (temp keys), which to_dict() then returned."""
    s.state.increment(key, 1e308)
    with pytest.raises(StateValueError, match="finite"):
        s.state.increment(key, 1e308)
    assert s.state.get(key) == 1e308


def test_an_increment_past_64_bits_stays_an_exact_int(s: Session) -> None:
    s.state["c"] = 2**62
    assert s.state.increment("c", 2**62) == 2**63
    assert s.state["c"] == 2**63 and type(s.state["c"]) is int


def test_state_is_durable_and_shared_between_objects(flow: SessionFlow, s: Session) -> None:
    s.state["k"] = 1
    other = flow.get_session(s.id)
    assert other.state["k"] == 1
    assert other.state is not s.state and s.state is s.state


def test_increment_and_append(s: Session) -> None:
    st = s.state
    assert st.increment("n") == 1
    assert st.increment("n", 5) == 6
    assert st.increment("n", -1.5) == 4.5
    assert st.append("l", "a") == 1 and st.append("l", {"b": 1}) == 2
    assert st["l"] == ["a", {"b": 1}]
    st["s"] = "text"
    with pytest.raises(StateValueError, match="'s'"):
        st.increment("s")
    with pytest.raises(StateValueError, match="'s'"):
        st.append("s", 1)
    for bad in (True, "1", None, float("nan")):
        with pytest.raises(SessionFlowError):
            st.increment("n", bad)  # type: ignore[arg-type]
    assert st["n"] == 4.5 and st["s"] == "text"


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ((1, 2), "tuple"),
        ({1, 2}, "set"),
        (b"x", "bytes"),
        (float("inf"), "float"),
        ({1: "int key"}, "int"),
        ([1, object()], "object"),
        ({"nested": {"deep": (1,)}}, "tuple"),
    ],
)
def test_non_json_values_refused_and_nothing_written(
    s: Session, value: Any, type_name: str
) -> None:
    s.state["keep"] = 1
    with pytest.raises(StateValueError) as info:
        s.state.update({"keep": 2, "bad": value})
    assert "'bad'" in str(info.value) and type_name in str(info.value)
    assert info.value.key == "bad"
    assert s.state.to_dict() == {"keep": 1}
    with pytest.raises(StateValueError):
        s.state.append("list", value)
    assert "list" not in s.state


def test_size_limits(s: Session) -> None:
    with pytest.raises(StateValueError, match="state_max_value_bytes"):
        s.state["big"] = "x" * 300
    for i in range(6):
        s.state[f"k{i}"] = "y" * 150  # 152 bytes as JSON each
    with pytest.raises(StateValueError, match="state_max_session_bytes"):
        s.state["k6"] = "y" * 150
    s.state["k0"] = "z" * 150  # replacing a value counts only the new size
    with pytest.raises(StateValueError, match="state_max_session_bytes"):
        for _ in range(20):
            s.state.append("k1list", "w" * 20)
    assert "big" not in s.state and "k6" not in s.state


def test_bad_keys(s: Session) -> None:
    for key in ("", None, 3, "user:", "app:", "temp:", "x" * 256):
        with pytest.raises(InvalidArgument):
            s.state.get(key)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        s.state.update([("a", 1)])  # type: ignore[arg-type]


def test_bad_settings_rejected(tmp_path: Path) -> None:
    from sessionflow import ConfigurationError

    for conf in ({"state_max_value_bytes": 0}, {"history_max_runs": "5"}):
        flow = make_flow(tmp_path / "x.db", **conf)
        with pytest.raises(ConfigurationError):
            flow.config  # noqa: B018
        flow.app.close()


# -- compare-and-set -----------------------------------------------------------------


def test_read_modify_write_conflict_never_overwrites(flow: SessionFlow, s: Session) -> None:
    mine, theirs = s.state, flow.get_session(s.id).state
    mine["n"] = 10
    seen = mine.get("n")
    theirs.set("n", theirs.get("n") + 5)
    with pytest.raises(StateConflict) as info:
        mine.set("n", seen + 1)
    assert info.value.keys == ["n"]
    assert theirs.get("n") == 15
    # The conflict forgets the version: read again and retry.
    mine.set("n", mine.get("n") + 1)
    assert theirs["n"] == 16


def test_conflicting_update_writes_nothing(flow: SessionFlow, s: Session) -> None:
    mine, theirs = s.state, flow.get_session(s.id).state
    mine.update({"a": 1, "b": 1})
    mine.get("a"), mine.get("b")
    theirs["b"] = 2
    with pytest.raises(StateConflict) as info:
        mine.update({"a": 10, "b": 10})
    assert info.value.keys == ["b"]
    assert theirs.to_dict() == {"a": 1, "b": 2}


def test_delete_is_compare_and_set_and_versions_are_integers(flow: SessionFlow, s: Session) -> None:
    mine, theirs = s.state, flow.get_session(s.id).state
    mine["k"] = "v"
    mine.get("k")
    theirs.delete("k")
    theirs["k"] = "again"  # a re-created key never reuses an old version
    with pytest.raises(StateConflict):
        mine.delete("k")
    versions = [version for _, version in flow.store.state_scope("session", s.id).values()]
    assert versions == [3] and all(type(v) is int for v in versions)
    missing = mine.get("other")
    assert missing is None
    theirs["other"] = 1
    with pytest.raises(StateConflict):
        mine.set("other", 2)  # read as missing, created meanwhile


def test_blind_write_allowed(flow: SessionFlow, s: Session) -> None:
    flow.get_session(s.id).state["k"] = 1
    s.state["k"] = 2
    s.state["k"] = 3
    assert s.state["k"] == 3


def test_errors_survive_celery_serialization() -> None:
    for exc in (StateConflict("m", ["a", "b"]), StateValueError("m", "k")):
        again = type(exc)(*exc.args)
        assert str(again) == "m" and again.args == exc.args


# -- scopes -------------------------------------------------------------------------------


def test_scopes(flow: SessionFlow) -> None:
    a1, a2 = open_session(flow, "alice"), open_session(flow, "alice")
    bob, anon = open_session(flow, "bob"), open_session(flow)
    try:
        a1.state["k"] = "a1"
        a1.state["user:pref"] = "dark"
        bob.state["user:pref"] = "light"
        anon.state["app:motd"] = "hi"
        a1.state["temp:scratch"] = 1
        assert a2.state.get("k") is None and a2.state["user:pref"] == "dark"
        assert bob.state["user:pref"] == "light" and bob.state["app:motd"] == "hi"
        assert flow.get_session(a1.id).state.get("temp:scratch") is None
        assert a1.state.to_dict() == {
            "app:motd": "hi",
            "k": "a1",
            "temp:scratch": 1,
            "user:pref": "dark",
        }
        with pytest.raises(InvalidArgument, match="user_id"):
            anon.state.get("user:pref")
        with pytest.raises(InvalidArgument, match="user_id"):
            anon.state.increment("user:n")
        assert anon.state.keys() == ["app:motd"]
        a2.state.clear()
        assert a1.state["user:pref"] == "dark" and a1.state["k"] == "a1"
        stored = {
            key
            for scope, scope_id in (("session", a1.id), ("session", a2.id), ("user", "alice"))
            for key in flow.store.state_scope(scope, scope_id)
        }
        assert not any(k.startswith("temp:") for k in stored)
    finally:
        flow.get_session(anon.id).state.delete("app:motd")  # app: keys are shared


def test_temp_keys_live_only_for_one_task(flow: SessionFlow, s: Session) -> None:
    def first(st: Any) -> Any:
        st["temp:x"] = 1
        st.increment("temp:n")
        return st.get("temp:x"), st.to_dict()

    state, (value, seen) = run_task(flow, s, "t1", first)
    assert state == states.SUCCESS and value == 1 and seen["temp:n"] == 1
    state, value = run_task(flow, s, "t2", lambda st: st.get("temp:x"))
    assert value is None


# -- branches -----------------------------------------------------------------------------


def task_a(flow: SessionFlow) -> Any:
    return flow.app.tasks["t.a"]


def member_ids(result: Any) -> list[str]:
    return [child.id for child in result.children]


def test_group_branches_read_snapshot_and_merge_in_member_order(
    flow: SessionFlow, s: Session
) -> None:
    s.state.update({"shared": "before", "gone": 1, "n": 100})
    a = task_a(flow)
    ids = member_ids(s.apply_async(group(a.s(i) for i in range(3))))
    s.state["shared"] = "changed after dispatch"  # branches still read the snapshot

    def body(i: int) -> Callable[[Any], Any]:
        def run(st: Any) -> Any:
            seen = st.get("shared")
            st["shared"] = f"member {i}"
            st["own"] = i
            st.increment("n", 10)
            st.append("log", i)
            if i == 1:
                st.delete("gone")
            return seen, st.get("own"), st.get("n")

        return run

    # finish in reverse order: the outcome must still follow member order
    outcomes = {i: run_task(flow, s, ids[i], body(i)) for i in (2, 0, 1)}
    assert all(o == (states.SUCCESS, ("before", i, 110)) for i, o in outcomes.items())
    assert s.state.to_dict() == {"shared": "member 2", "own": 2, "n": 130, "log": [0, 1, 2]}


def test_branch_writes_invisible_until_all_finished(flow: SessionFlow, s: Session) -> None:
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(2))))
    run_task(flow, s, ids[0], lambda st: st.set("k", 1))
    assert "k" not in s.state
    run_task(flow, s, ids[1], lambda st: st.increment("c"))
    assert s.state.to_dict() == {"k": 1, "c": 1}


def test_failed_member_counts_and_is_discarded(flow: SessionFlow, s: Session) -> None:
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(3))))

    def failing(st: Any) -> None:
        st["bad"] = True
        raise RuntimeError("member failed")

    run_task(flow, s, ids[0], lambda st: st.append("ok", 0))
    run_task(flow, s, ids[2], lambda st: st.append("ok", 2))
    state, _ = run_task(flow, s, ids[1], failing)
    assert state == states.FAILURE
    assert s.state.to_dict() == {"ok": [0, 2]}
    history = s.history()
    assert [r.state for r in history][-1] == states.FAILURE
    assert history[-1].error == "RuntimeError: member failed"


def test_chain_member_steps_see_earlier_steps(flow: SessionFlow, s: Session) -> None:
    a = task_a(flow)
    sig = group(chain(a.s(0), a.s()), a.s(1))
    sig.freeze()
    from sessionflow import canvas

    leaf = [x.id for x in canvas.leaves(sig)]
    s.apply_async(sig)
    run_task(flow, s, leaf[0], lambda st: st.set("step", 1))
    _, seen = run_task(flow, s, leaf[1], lambda st: (st.get("step"), st.set("step", 2))[0])
    assert seen == 1 and "step" not in s.state
    run_task(flow, s, leaf[2], lambda st: st.set("other", 1))
    assert s.state.to_dict() == {"step": 2, "other": 1}


def test_failed_chain_step_discards_later_steps(flow: SessionFlow, s: Session) -> None:
    a = task_a(flow)
    sig = group(chain(a.s(0), a.s()), a.s(1))
    sig.freeze()
    from sessionflow import canvas

    leaf = [x.id for x in canvas.leaves(sig)]
    s.apply_async(sig)
    run_task(flow, s, leaf[0], lambda st: 1 / 0)
    run_task(flow, s, leaf[2], lambda st: st.set("other", 1))
    assert s.state.to_dict() == {"other": 1}


def test_deferred_group_snapshots_when_it_starts(flow: SessionFlow, s: Session) -> None:
    a = task_a(flow)
    sig = chain(a.s(0), group(a.s(), a.s()))
    sig.freeze()
    from sessionflow import canvas

    leaf = [x.id for x in canvas.leaves(sig)]
    s.apply_async(sig)
    run_task(flow, s, leaf[0], lambda st: st.set("first", "done"))
    _, seen = run_task(flow, s, leaf[1], lambda st: st.get("first"))
    assert seen == "done"


def test_chord_merges_before_body(flow: SessionFlow, s: Session) -> None:
    a = task_a(flow)
    sig = chord([a.s(1), a.s(2)], a.s())
    sig.freeze()
    from sessionflow import canvas

    leaf = [x.id for x in canvas.leaves(sig)]
    s.apply_async(sig)
    run_task(flow, s, leaf[1], lambda st: st.append("parts", 2))
    run_task(flow, s, leaf[0], lambda st: st.append("parts", 1))
    _, seen = run_task(flow, s, leaf[2], lambda st: st.get("parts"))
    assert seen == [1, 2]


def test_merge_raise_reports_every_conflicting_key(flow: SessionFlow) -> None:
    s = open_session(flow, merge_policy="raise")
    s.state.update({"a": 0, "b": 0})
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(3))))
    run_task(flow, s, ids[0], lambda st: st.update({"a": 1, "b": 1, "mine0": 1}))
    run_task(flow, s, ids[1], lambda st: st.update({"a": 2, "same": "x"}))
    state, error = run_task(flow, s, ids[2], lambda st: st.update({"b": 3, "same": "x"}))
    assert state == states.FAILURE and isinstance(error, StateConflict)
    assert error.keys == ["a", "b"]
    assert s.state.to_dict() == {"a": 0, "b": 0}  # nothing merged
    assert flow.store.branch_view(group_of(ids[0]), 0, 0) is None  # conflicted: closed


def test_merge_raise_accepts_disjoint_and_atomic_writes(flow: SessionFlow) -> None:
    s = open_session(flow, merge_policy="raise")
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(2))))
    run_task(flow, s, ids[0], lambda st: (st.set("x", 1), st.increment("n"), st.append("l", 0)))
    state, _ = run_task(
        flow, s, ids[1], lambda st: (st.set("y", 1), st.increment("n"), st.append("l", 1))
    )
    assert state == states.SUCCESS
    assert s.state.to_dict() == {"x": 1, "y": 1, "n": 2, "l": [0, 1]}


def test_merge_raise_detects_live_change_since_snapshot(flow: SessionFlow) -> None:
    s = open_session(flow, merge_policy="raise")
    s.state["k"] = 1
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(1))))
    s.state["k"] = 2
    state, error = run_task(flow, s, ids[0], lambda st: st.set("k", 3))
    assert state == states.FAILURE and isinstance(error, StateConflict) and error.keys == ["k"]


def test_reducers(flow: SessionFlow) -> None:
    flow.register_reducer("longest", lambda cur, new: new if len(new) > len(cur or "") else cur)
    reducers = {
        "total": "sum",
        "hi": "max",
        "lo": "min",
        "tags": "union",
        "cfg": "merge",
        "items": "append",
        "name": "longest",
    }
    s = open_session(flow, reducers=reducers)
    s.state.update({"total": 100, "tags": ["a"], "cfg": {"x": 1}})
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(3))))
    for i in (2, 1, 0):
        run_task(
            flow,
            s,
            ids[i],
            lambda st, i=i: st.update(
                {
                    "total": i + 1,
                    "hi": i,
                    "lo": i,
                    "tags": ["a", f"t{i}"],
                    "cfg": {f"k{i}": i},
                    "items": i,
                    "name": "n" * (i % 2 + 1),
                }
            ),
        )
    assert s.state.to_dict() == {
        "total": 106,
        "hi": 2,
        "lo": 0,
        "tags": ["a", "t0", "t1", "t2"],
        "cfg": {"x": 1, "k0": 0, "k1": 1, "k2": 2},
        "items": [0, 1, 2],
        "name": "nn",
    }


def test_unregistered_reducer_fails_the_merging_task(tmp_path: Path) -> None:
    flow = make_flow(tmp_path / "r.db")
    flow.register_reducer("custom", lambda cur, new: new)
    s = open_session(flow, reducers={"k": "custom"})
    ids = member_ids(s.apply_async(group(task_a(flow).s(i) for i in range(1))))
    flow.reducers.clear()  # a worker process that never registered it
    state, error = run_task(flow, s, ids[0], lambda st: st.set("k", 1))
    assert state == states.FAILURE and "register_reducer" in str(error)
    assert "k" not in s.state
    flow.close()
    flow.app.close()


def test_non_branch_tasks_write_through(flow: SessionFlow, s: Session) -> None:
    run_task(flow, s, "plain", lambda st: st.set("k", 1))
    assert s.state["k"] == 1


# -- history ---------------------------------------------------------------------------


def test_history_order_limit_compact_and_bound(flow: SessionFlow, s: Session) -> None:
    assert s.history() == []
    for i in range(4):
        run_task(flow, s, f"t{i}", lambda st: None)
    run_task(flow, s, "t4", lambda st: 1 / 0)
    runs = s.history()
    assert [r.task_id for r in runs] == ["t0", "t1", "t2", "t3", "t4"]
    assert runs[-1].state == states.FAILURE and "ZeroDivisionError" in (runs[-1].error or "")
    assert runs[0].worker == "w@test" and runs[0].name == "t.a"
    assert runs[0].started_at <= runs[0].finished_at
    assert [r.task_id for r in s.history(limit=2)] == ["t3", "t4"]
    run_task(flow, s, "t5", lambda st: None)  # history_max_runs=5 drops the oldest
    assert [r.task_id for r in s.history()] == ["t1", "t2", "t3", "t4", "t5"]
    assert s.compact(keep_last=2) == 3
    assert [r.task_id for r in s.history()] == ["t4", "t5"]
    assert s.compact(keep_last=0) == 2 and s.history() == []
    for bad in (-1, 1.5, None, True):
        with pytest.raises(InvalidArgument):
            s.compact(keep_last=bad)  # type: ignore[arg-type]
    for bad in (0, -2, "3", True):
        with pytest.raises(InvalidArgument):
            s.history(limit=bad)  # type: ignore[arg-type]


def test_history_is_per_session(flow: SessionFlow, s: Session) -> None:
    other = open_session(flow)
    run_task(flow, s, "mine", None)
    run_task(flow, other, "theirs", None)
    assert [r.task_id for r in s.history()] == ["mine"]
    assert [r.task_id for r in other.history()] == ["theirs"]


def test_writes_to_an_ended_or_unknown_session_are_refused(flow: SessionFlow, s: Session) -> None:
    s.state.update({"kept": 1, "user:pref": "x"})
    assert flow.store.end_session(s.id, SessionStatus.CLOSED, "completed")
    before = dict(flow.store.state_scope("session", s.id))
    state = flow.get_session(s.id).state
    for write in (
        lambda: state.set("k", 2),
        lambda: state.update({"k": 2}),
        lambda: state.increment("n"),
        lambda: state.append("log", 1),
        lambda: state.delete("kept"),
        lambda: state.set("user:pref", "y"),
        lambda: state.set("app:global", 1),
        state.clear,
    ):
        with pytest.raises(SessionClosed):
            write()
    assert flow.store.state_scope("session", s.id) == before
    assert state["kept"] == 1 and state["user:pref"] == "x"  # reading stays possible
    ghost = Session(flow, "no-such-session").state
    with pytest.raises(SessionNotFound):
        ghost.set("k", 1)
    with pytest.raises(SessionNotFound):
        ghost.increment("app:n")
    assert flow.store.state_scope("session", "no-such-session") == {}
    assert "app:n" not in flow.store.state_scope("app", "")

"""Session state on real workers: sharing, no lost updates, branches, scopes, history."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import chain, chord, group

from harness import Stack, wait_until
from sessionflow import InvalidArgument, Session, SessionFlow, StateConflict

pytestmark = pytest.mark.integration
GET = 60


def task(stack: Stack, name: str) -> Any:
    return stack.app.tasks[f"sfapp.{name}"]


def own(state: dict[str, Any]) -> dict[str, Any]:
    """The session's own keys (app: keys are shared with every other test)."""
    return {k: v for k, v in state.items() if not k.startswith("app:")}


def one_session_per_worker(stack: Stack, flow: SessionFlow, **options: Any) -> list[Session]:
    """Open sessions until both workers hold one; returns one per worker (others stay open)."""
    by_host: dict[str, Session] = {}
    for _ in range(4):  # two workers with --max-sessions 2
        s = flow.create_session(creation_timeout=30, execution_timeout=600, **options)
        by_host.setdefault(s.info.hostname, s)
        if len(by_host) == 2:
            break
    assert len(by_host) == 2, "expected sessions on both workers"
    return list(by_host.values())


def test_three_steps_share_state(stack: Stack, flow: SessionFlow) -> None:
    set_, get, dump = task(stack, "state_set"), task(stack, "state_get"), task(stack, "state_dump")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        s.state["user_id"] = 42
        s.apply_async(set_, args=("user", {"id": 42, "name": "Ada"})).get(timeout=GET)
        assert s.apply_async(get, args=("user",)).get(timeout=GET) == {"id": 42, "name": "Ada"}
        report = s.apply_async(chain(set_.si("orders", [1, 2]), get.si("orders"), dump.si())).get(
            timeout=GET
        )
        assert own(report) == {"user_id": 42, "user": {"id": 42, "name": "Ada"}, "orders": [1, 2]}
        assert s.state["orders"] == [1, 2]  # the client reads what tasks wrote
    # State outlives the session and is found again by id.
    assert flow.get_session(s.id).state["user"]["name"] == "Ada"


def test_1000_increments_from_four_processes(stack: Stack, flow: SessionFlow) -> None:
    """2 client processes + the tasks of 2 sessions on 2 workers, all at once, one app: key."""
    tag = uuid.uuid4().hex[:8]
    key = f"app:counter-{tag}"
    sessions = one_session_per_worker(stack, flow)
    incr = task(stack, "state_incr")
    results = [s.apply_async(incr, args=(key, 250, tag)) for s in sessions]
    client_code = (
        "from sessionflow import SessionFlow\n"
        "from sfapp import await_start\n"
        f"st = SessionFlow(app).get_session({sessions[0].id!r}).state\n"
        f"await_start(st, {tag!r})\n"
        f"for _ in range(250): st.increment({key!r})\n"
    )
    errors: list[BaseException] = []

    def client() -> None:
        try:
            stack.run_client(client_code, timeout=120)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    state = sessions[0].state
    wait_until(lambda: state.get(f"app:ready-{tag}") == 4, 60, "4 writers to be ready")
    state[f"app:go-{tag}"] = True
    assert [r.get(timeout=120) for r in results] == [250, 250]
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert state[key] == 1000
    for name in (key, f"app:ready-{tag}", f"app:go-{tag}"):
        state.delete(name)


def test_get_set_under_contention_never_loses_an_update(stack: Stack, flow: SessionFlow) -> None:
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    rmw = task(stack, "state_rmw")
    results = [s.apply_async(rmw, args=("n", 40)) for _ in range(2)]
    conflicts = 0
    state = s.state
    for _ in range(40):
        while True:
            try:
                state.set("n", state.get("n", 0) + 1)
                break
            except StateConflict:
                conflicts += 1
    conflicts += sum(r.get(timeout=GET) for r in results)
    assert state["n"] == 120  # every success counted exactly once
    s.complete()


def test_forty_branches_merge_operations_in_member_order(stack: Stack, flow: SessionFlow) -> None:
    branch = task(stack, "state_branch")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        s.state.update({"hits": 7, "seen_at_dispatch": "before", "doomed": 1})
        result = s.apply_async(group(branch.s(i, 25) for i in range(40)))
        s.state["seen_at_dispatch"] = "after"  # branches read the state as dispatched
        values = result.get(timeout=GET)
        # visible as soon as the group result is ready
        state = s.state.to_dict()
    assert {v["seen"] for v in values} == {"before"}
    assert {v["hits_in_branch"] for v in values} == {32}  # snapshot 7 + its own 25
    assert state["hits"] == 7 + 40 * 25
    assert state["order"] == list(range(40))
    assert state["winner"] == 39  # last member in order, whatever finished last
    assert all(state[f"member{i}"] == i for i in range(40))
    assert "doomed" not in state  # deletes merge too
    assert state["seen_at_dispatch"] == "after"  # no branch wrote it: the later write stays


def test_chord_body_sees_merged_state(stack: Stack, flow: SessionFlow) -> None:
    branch, dump = task(stack, "state_branch"), task(stack, "state_dump")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        merged = s.apply_async(chord((branch.s(i, 2) for i in range(5)), dump.s())).get(timeout=GET)
        assert merged["hits"] == 10 and merged["order"] == [0, 1, 2, 3, 4]
        deferred = s.apply_async(
            chain(task(stack, "state_set").si("base", 1), group(branch.si(i, 1) for i in range(3)))
        ).get(timeout=GET)
        assert [d["hits_in_branch"] for d in deferred] == [11, 11, 11]
        assert s.state["hits"] == 13 and s.state["order"] == [0, 1, 2, 3, 4, 0, 1, 2]


def test_failed_branch_is_discarded_and_others_merge(stack: Stack, flow: SessionFlow) -> None:
    branch, fail = task(stack, "state_branch"), task(stack, "state_fail_branch")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        result = s.apply_async(group(branch.s(0, 1), fail.s(1), branch.s(2, 1)))
        with pytest.raises(RuntimeError):
            result.get(timeout=GET)
        wait_until(lambda: s.state.get("hits") == 2, 20, "the surviving branches to merge")
        assert s.state["order"] == [0, 2] and "failed1" not in s.state


def test_merge_raise_reports_conflicting_keys(stack: Stack, flow: SessionFlow) -> None:
    write = task(stack, "state_write")
    with flow.create_session(creation_timeout=30, execution_timeout=600, merge="raise") as s:
        s.state["a"] = 0
        result = s.apply_async(
            group(write.s({"a": 1, "b": 1}), write.s({"a": 2, "c": 1}), write.s({"b": 3}))
        )
        with pytest.raises(StateConflict) as info:
            result.get(timeout=GET)
        assert info.value.keys == ["a", "b"]
        assert own(s.state.to_dict()) == {"a": 0}


def test_reducers_on_workers(stack: Stack, flow: SessionFlow) -> None:
    write = task(stack, "state_write")
    reducers = {"total": "sum", "name": "longest", "tags": "union"}
    with flow.create_session(creation_timeout=30, execution_timeout=600, reducers=reducers) as s:
        s.apply_async(
            group(write.s({"total": i, "name": "x" * (i % 3), "tags": [i % 2]}) for i in range(6))
        ).get(timeout=GET)
        assert own(s.state.to_dict()) == {"total": 15, "name": "xx", "tags": [0, 1]}


def test_scopes_across_workers(stack: Stack, flow: SessionFlow) -> None:
    set_, get = task(stack, "state_set"), task(stack, "state_get")
    tag = uuid.uuid4().hex[:8]
    alice1, alice2 = one_session_per_worker(stack, flow, user_id=f"alice-{tag}")
    with flow.create_session(
        creation_timeout=30, execution_timeout=600, user_id=f"bob-{tag}"
    ) as bob:
        alice1.apply_async(set_, args=("user:theme", "dark")).get(timeout=GET)
        alice1.apply_async(set_, args=("mine", 1)).get(timeout=GET)
        assert alice2.apply_async(get, args=("user:theme",)).get(timeout=GET) == "dark"
        assert alice2.apply_async(get, args=("mine",)).get(timeout=GET) is None
        assert bob.apply_async(get, args=("user:theme",)).get(timeout=GET) is None
        bob.apply_async(set_, args=(f"app:shared-{tag}", "hi")).get(timeout=GET)
        assert alice1.state[f"app:shared-{tag}"] == "hi"
        alice1.apply_async(set_, args=("temp:x", 1)).get(timeout=GET)
        assert alice1.apply_async(get, args=("temp:x",)).get(timeout=GET) is None
    anon = flow.create_session(creation_timeout=30, execution_timeout=600)
    with anon, pytest.raises(InvalidArgument, match="user_id"):
        anon.apply_async(get, args=("user:theme",)).get(timeout=GET)


def test_history_records_failures_and_retries(stack: Stack, flow: SessionFlow) -> None:
    fail, where = task(stack, "fail"), task(stack, "where")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        ok = s.apply_async(where, args=(1,))
        ok.get(timeout=GET)
        retried = s.apply_async(fail, args=(1,))
        assert retried.get(timeout=GET) == 1
        failed = s.apply_async(fail, args=())
        with pytest.raises(ValueError):
            failed.get(timeout=GET)
        wait_until(lambda: len(s.history()) == 4, 20, "4 runs in the history")
        runs = s.history()
        assert [(r.task_id, r.state) for r in runs] == [
            (ok.id, "SUCCESS"),
            (retried.id, "RETRY"),
            (retried.id, "SUCCESS"),
            (failed.id, "FAILURE"),
        ]
        assert runs[3].error == "ValueError: boom" and runs[1].error
        assert {r.worker for r in runs} == {s.info.hostname}
        assert all(r.started_at <= r.finished_at for r in runs)
        assert runs[0].name == "sfapp.where"
        assert [r.state for r in s.history(limit=1)] == ["FAILURE"]
        assert s.compact(keep_last=1) == 3
        assert [r.task_id for r in s.history()] == [failed.id]


def test_state_examples_run() -> None:
    """examples/state/run.py (workflow and fan-out) passes on the embedded default, once."""
    run = Path(__file__).resolve().parents[2] / "examples" / "state" / "run.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATE_EXAMPLE_")}
    done = subprocess.run(
        [sys.executable, str(run)],
        cwd=run.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "workflow: Ada Lovelace (gold): 2 orders, 155.50 total" in done.stdout, output
    assert "OK" in done.stdout.splitlines()[-1], output

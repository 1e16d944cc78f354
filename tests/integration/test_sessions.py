"""Sessions on real workers: creation, pinning of every canvas shape, completion."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import chain, chord, group

from harness import Stack, wait_until
from sessionflow import (
    InvalidArgument,
    SessionClosed,
    SessionCreationTimeout,
    SessionFlow,
    SessionNotFound,
    SessionState,
)
from sessionflow.enums import SessionStatus, TaskStatus

pytestmark = pytest.mark.integration
GET = 30  # seconds a result may take before the test counts it as hung


def task(stack: Stack, name: str) -> Any:
    return stack.app.tasks[f"sfapp.{name}"]


def hosts(value: Any) -> set[str]:
    """Every worker hostname in a (nested) result of sfapp.where."""
    if isinstance(value, dict):
        found = {value["hostname"]} if "hostname" in value else set()
        for item in value.get("args", []):
            found |= hosts(item)
        return found
    if isinstance(value, list):
        return set().union(*(hosts(v) for v in value)) if value else set()
    return set()


def test_create_reports_worker_and_metadata(stack: Stack, flow: SessionFlow) -> None:
    with flow.create_session(
        creation_timeout=30,
        execution_timeout=600,
        user_id="u1",
        agent_id="a1",
        metadata={"k": [1, 2]},
    ) as s:
        info = s.info
        assert info.state is SessionState.OPEN
        assert info.hostname in {w.nodename for w in stack.workers.values()}
        assert (info.user_id, info.agent_id, info.metadata) == ("u1", "a1", {"k": [1, 2]})
        assert info.session_id == s.id and info.recreate_token
    assert s.info.state is SessionState.CLOSED and s.info.reason == "completed"


def test_single_tasks_pinned(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        results = [s.apply_async(where, args=(i,)).get(timeout=GET) for i in range(8)]
        results.append(s.apply_async(where.s(99)).get(timeout=GET))
    assert {r["hostname"] for r in results} == {s.info.hostname}
    assert {r["session"] for r in results} == {s.id}


def test_sessions_spread_and_each_stays_pinned(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    sessions = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(4)]
    try:
        assert {s.info.hostname for s in sessions} == {w.nodename for w in stack.workers.values()}
        pending = [(s, s.apply_async(where, args=(i,))) for s in sessions for i in range(5)]
        for s, result in pending:
            assert result.get(timeout=GET)["hostname"] == s.info.hostname
    finally:
        for s in sessions:
            s.complete()


@pytest.mark.parametrize(
    "shape",
    ["chain", "group", "chord", "nested", "chain_ending_in_group"],
)
def test_canvas_pinned(stack: Stack, flow: SessionFlow, shape: str) -> None:
    where, collect = task(stack, "where"), task(stack, "collect")
    canvases = {
        "chain": lambda: chain(where.s(1), where.s(), where.s()),
        "group": lambda: group(where.s(i) for i in range(6)),
        "chord": lambda: chord((where.s(i) for i in range(4)), collect.s()),
        "nested": lambda: chain(
            where.s(1),
            group(where.s(), chain(where.s(), where.s())),
            collect.s(),
            chord([where.s(), where.s()], collect.s()),
        ),
        "chain_ending_in_group": lambda: chain(where.s(1), group(where.s(), where.s())),
    }
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        value = s.apply_async(canvases[shape]()).get(timeout=GET)
        expected = s.info.hostname
    seen = hosts(value)
    assert seen == {expected}


def test_current_session_inside_tasks(stack: Stack, flow: SessionFlow) -> None:
    where, spawn = task(stack, "where"), task(stack, "spawn")
    assert where.apply_async(args=(1,)).get(timeout=GET)["session"] is None
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        child_id = s.apply_async(spawn, args=("x",)).get(timeout=GET)
        child = stack.app.AsyncResult(child_id).get(timeout=GET)
        assert child["session"] == s.id and child["hostname"] == s.info.hostname
        assert s.apply_async(task(stack, "nested_create")).get(timeout=GET) == "NestedSessionError"


def test_cap_creation_timeout_and_slot_freed_by_complete(stack: Stack, flow: SessionFlow) -> None:
    # Two workers with --max-sessions 2 each: four sessions fill them.
    began = datetime.now(timezone.utc)  # sessions of earlier tests fail for other reasons
    sessions = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(4)]
    counts: dict[str, int] = {}
    for s in sessions:
        counts[s.info.hostname] = counts.get(s.info.hostname, 0) + 1
    assert sorted(counts.values()) == [2, 2]
    started = time.monotonic()
    with pytest.raises(SessionCreationTimeout):
        flow.create_session(creation_timeout=2, execution_timeout=600)
    assert 2 <= time.monotonic() - started < 10
    # The request that timed out never becomes an open session later.
    time.sleep(1.0)
    assert len(flow.list_sessions(state="open")) == 4
    freed = sessions.pop(0)
    freed_host = freed.info.hostname
    freed.complete()
    late = flow.create_session(creation_timeout=30, execution_timeout=600)
    sessions.append(late)
    assert late.info.hostname == freed_host
    assert len(flow.list_sessions(state="open")) == 4
    never_opened = [
        failed.info.reason
        for failed in flow.list_sessions(state="failed")
        if failed.info.opened_at is None and failed.info.created_at >= began
    ]
    assert never_opened == ["creation_timeout"]  # the one that timed out, failed as such
    for s in sessions:
        s.complete()


def test_unstarted_tasks_of_completed_session_do_not_run(stack: Stack, flow: SessionFlow) -> None:
    sleep, touch = task(stack, "sleep"), task(stack, "touch")
    data = stack.root / "data"
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    # Both pool processes of the worker are busy; the touches wait behind them.
    busy = [s.apply_async(sleep, args=(2,)) for _ in range(2)]
    wait_until(
        lambda: all(_started(flow, s, r.id) for r in busy),
        20,
        "the sleeps to start",
    )
    names = [f"touch-{s.id}-{i}" for i in range(4)]
    touches = [s.apply_async(touch, args=(name,)) for name in names]
    chained = s.apply_async(chain(touch.s(f"{names[0]}-c1"), touch.si(f"{names[0]}-c2")))
    s.complete()
    assert [r.get(timeout=GET) for r in busy] == [2, 2]  # running tasks finish
    for result in [*touches, chained, chained.parent]:
        with pytest.raises(SessionClosed):
            result.get(timeout=GET)
    time.sleep(1.0)  # give a wrongly run task time to leave its trace
    assert not [p.name for p in data.iterdir() if p.name.startswith(f"touch-{s.id}")]


def _started(flow: SessionFlow, session: Any, task_id: str) -> bool:
    """The store knows the task runs (its worker's writer recorded the start)."""
    return any(
        t.task_id == task_id and t.status is TaskStatus.STARTED
        for t in flow.store.tasks(session.id)
    )


def test_apply_async_after_complete_raises(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    s.complete()
    s.complete()  # idempotent
    with pytest.raises(SessionClosed) as err:
        s.apply_async(where, args=(1,))
    assert err.value.session_id == s.id and err.value.reason == "completed"


def test_a_second_complete_returns_only_once_no_task_starts(
    stack: Stack, flow: SessionFlow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers complete one session: the one whose end came second returned at once,
    before the worker had applied the end, and tasks of the session still started."""
    tell = flow._tell_owner

    def slow_tell(owner: str, session_id: str) -> bool:
        time.sleep(0.5)  # a busy broker: the worker hears of the end late
        return tell(owner, session_id)

    monkeypatch.setattr(flow, "_tell_owner", slow_tell)
    sleep = task(stack, "sleep")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    results = [s.apply_async(sleep, args=(0.01,)) for _ in range(300)]  # 1.5 s of work
    results[0].get(timeout=GET)  # they are running, one after another
    returned: dict[str, datetime] = {}

    def first() -> None:
        s.complete()
        returned["first"] = datetime.now(timezone.utc)

    def second() -> None:  # completes the session as soon as the first end is in the store
        while flow.store.statuses([s.id])[s.id][0] is SessionStatus.OPEN:
            time.sleep(0.001)
        flow.get_session(s.id).complete()
        returned["second"] = datetime.now(timezone.utc)

    threads = [threading.Thread(target=second), threading.Thread(target=first)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GET)
    assert set(returned) == {"first", "second"}
    # Outcomes from the store, not the results: the file:// backend of the embedded stack
    # can tear a SessionClosed that the worker and its pool process write at once.
    final = {TaskStatus.SUCCEEDED, TaskStatus.CANCELLED}
    tasks = wait_until(
        lambda: (
            (found := flow.store.tasks(s.id))
            and sum(t.status in final for t in found) == len(results)
            and found
        ),
        GET,
        "every task to have run or been cancelled",
    )
    ran = sum(t.status is TaskStatus.SUCCEEDED for t in tasks)
    assert 0 < ran < len(results)  # the end came while tasks were still queued
    runs = wait_until(lambda: (h := s.history()) and len(h) == ran and h, 20, "every run")
    late = [r.started_at for r in runs if r.started_at > returned["second"]]
    assert late == [], f"{len(late)} tasks started after the second complete() returned"


def test_resume_from_second_process(stack: Stack, flow: SessionFlow) -> None:
    with flow.create_session(creation_timeout=30, execution_timeout=600, user_id="resumer") as s:
        out = stack.run_client(
            "from sessionflow import SessionFlow\n"
            f"s = SessionFlow(app).get_session({s.id!r})\n"
            "r = s.apply_async(app.tasks['sfapp.where'], args=('remote',)).get(timeout=30)\n"
            "print(r['hostname'], s.info.user_id, s.info.state.value)\n"
        )
        assert out.split() == [s.info.hostname, "resumer", "open"]
        assert s in flow.list_sessions(user_id="resumer", state="open")
        assert s in flow.list_sessions(hostname=s.info.hostname)


def test_errors(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    with pytest.raises(SessionNotFound):
        flow.get_session("no-such-session")
    for bad in (
        {"creation_timeout": 0, "execution_timeout": 1},
        {"creation_timeout": 1, "execution_timeout": -1},
        {"creation_timeout": "1", "execution_timeout": 1},
        {"creation_timeout": 1, "execution_timeout": 1, "metadata": {"x": object()}},
        {"creation_timeout": 1, "execution_timeout": 1, "user_id": 5},
    ):
        with pytest.raises(InvalidArgument):
            flow.create_session(**bad)
    with pytest.raises(InvalidArgument):
        flow.list_sessions(state="bogus")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        with pytest.raises(InvalidArgument):
            s.apply_async(where, queue="elsewhere")
        with pytest.raises(InvalidArgument):
            s.apply_async("sfapp.where")
        with pytest.raises(InvalidArgument):
            s.apply_async(where, args=5)
        assert s.apply_async(where, args=(1,)).get(timeout=GET)["session"] == s.id

"""branches.py in a worker: a branch task reads its private view of the session state
when its body first uses the state, so one that never does costs no store round trip
before its body. A MemoryStore that counts the calls stands in for the store; the
middleware, ``state_for`` and the merge are the real ones."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from store_contract.helpers import opened, put, send

from sessionflow.branches import BranchMiddleware
from sessionflow.canvas import BRANCH_HEADER
from sessionflow.config import Config
from sessionflow.records import GroupSpec
from sessionflow.runtime import TaskRun, set_current_run
from sessionflow.session import Session
from sessionflow.store.memory import MemoryStore

MERGE_LOG = "sessionflow.branches"


class CountingStore(MemoryStore):
    """A MemoryStore that counts the calls of every public method."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if not name.startswith("_") and callable(value) and name != "calls":
            super().__getattribute__("calls")[name] += 1
        return value


@pytest.fixture
def flow() -> Any:
    return SimpleNamespace(store=CountingStore(), config=Config(), reducers={})


@pytest.fixture
def current() -> Iterator[list[TaskRun]]:
    runs: list[TaskRun] = []
    yield runs
    set_current_run(None)


def branch_run(flow: Any, session_id: str, task_id: str, header: list[Any]) -> TaskRun:
    request = {BRANCH_HEADER: header}
    return TaskRun(session_id, task_id, "app.t", "w@host", request, flow=flow)


def run_task(flow: Any, run: TaskRun, body: Any = None, state: str = "SUCCESS") -> None:
    """What the tracer does around a body: before_body, the body, after_body, after_task."""
    middleware = BranchMiddleware(flow)
    set_current_run(run)
    try:
        middleware.before_body(run)
        if body is not None:
            body(Session(flow, run.session_id))  # type: ignore[arg-type]
        if state == "SUCCESS":
            middleware.after_body(run, None)
        middleware.after_task(run, state)
    finally:
        set_current_run(None)


def test_a_branch_task_that_never_uses_state_reads_nothing_before_its_body(flow: Any) -> None:
    store: CountingStore = flow.store
    session_id = opened(store)
    send(store, session_id, "a", "b", groups=(GroupSpec("g", 2, True),))
    store.calls.clear()
    run = branch_run(flow, session_id, "a", ["g", 0, 0, 1])
    BranchMiddleware(flow).before_body(run)
    assert store.calls == Counter()  # before, one branch_view here
    run_task(flow, run)
    run_task(flow, branch_run(flow, session_id, "b", ["g", 1, 0, 1]))
    # each still counts itself finished: the group merged (nothing to merge)
    assert store.calls == Counter(branch_done=2)
    assert store.branch_view("g", 0, 0) is None


def test_a_branch_task_reads_its_view_on_first_use_and_writes_its_own_copy(flow: Any) -> None:
    store: CountingStore = flow.store
    session_id = opened(store)
    put(store, session_id, "n", 1)
    send(store, session_id, "a", "b", groups=(GroupSpec("g", 2, True),))
    put(store, session_id, "n", 5)  # after dispatch: not in the branches' snapshot
    seen: list[Any] = []

    def add(amount: int) -> Any:
        def body(session: Session) -> None:
            seen.append(session.state.get("n"))
            seen.append(session.state.increment("n", amount))

        return body

    store.calls.clear()
    run_task(flow, branch_run(flow, session_id, "a", ["g", 0, 0, 1]), add(10))
    assert store.calls["branch_view"] == 1 and seen == [1, 11]
    assert store.state_read("session", session_id, "n")[0] == 5  # not merged yet
    run_task(flow, branch_run(flow, session_id, "b", ["g", 1, 0, 1]), add(100))
    assert seen == [1, 11, 1, 101]
    assert store.state_read("session", session_id, "n")[0] == 115  # both increments merged


def test_a_delayed_group_snapshots_when_a_task_first_uses_the_state(flow: Any) -> None:
    store: CountingStore = flow.store
    session_id = opened(store)
    put(store, session_id, "k", "at dispatch")
    send(store, session_id, "a", "b", groups=(GroupSpec("g", 2, False),))
    run = branch_run(flow, session_id, "a", ["g", 0, 0, 1])
    set_current_run(run)
    try:
        BranchMiddleware(flow).before_body(run)
        put(store, session_id, "k", "at first use")  # after the task started
        assert Session(flow, session_id).state.get("k") == "at first use"  # type: ignore[arg-type]
    finally:
        set_current_run(None)


def test_a_failed_branch_task_that_never_used_state_still_counts_as_failed(flow: Any) -> None:
    store: CountingStore = flow.store
    session_id = opened(store)
    send(store, session_id, "a0", "a1", "b", groups=(GroupSpec("g", 3, True),))
    run_task(flow, branch_run(flow, session_id, "a0", ["g", 0, 0, 2]), state="FAILURE")
    # the member's later step is discarded with it: b alone completes the group
    body = lambda session: session.state.set("k", "b")  # noqa: E731
    run_task(flow, branch_run(flow, session_id, "b", ["g", 1, 0, 1]), body)
    assert store.state_read("session", session_id, "k")[0] == "b"


def test_a_branch_task_of_a_group_that_is_gone_ends_quietly(flow: Any) -> None:
    store: CountingStore = flow.store
    session_id = opened(store)
    run = branch_run(flow, session_id, "a", ["pruned", 0, 0, 1])
    run_task(flow, run)  # raises nothing: there was nothing to save
    run_task(flow, branch_run(flow, session_id, "b", ["pruned", 0, 0, 1]), state="FAILURE")
    assert store.calls["branch_done"] == 1 and store.calls["branch_failed"] == 1

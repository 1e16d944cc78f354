"""Helpers of the store contract: sessions, tasks and runs in one line, racing threads."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from sessionflow.enums import TaskStatus
from sessionflow.merge import MISSING, check_value, merge_branches, resolve_reducers
from sessionflow.records import Dispatch, GroupSpec, NewSession, Run, utcnow
from sessionflow.store.base import SessionStore, StateWrite

NODE, QUEUE = "w1@host", "sf.worker.w1"
NODE2, QUEUE2 = "w2@host", "sf.worker.w2"
T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=utcnow().tzinfo)
BIG = 1 << 20
Op = tuple[str, str, Any]


# -- helpers ---------------------------------------------------------------------------


def sid() -> str:
    return str(uuid.uuid4())


def pending(store: SessionStore, **options: Any) -> str:
    session_id = options.pop("id", None) or sid()
    values: dict[str, Any] = {
        "created_at": utcnow(),
        "creation_timeout": 10.0,
        "execution_timeout": 600.0,
        **options,
    }
    store.create_pending(NewSession(id=session_id, **values))
    return session_id


def opened(store: SessionStore, node: str = NODE, queue: str = QUEUE, **options: Any) -> str:
    session_id = pending(store, **options)
    assert store.admit(session_id, node, queue) is not None
    return session_id


def send(
    store: SessionStore,
    session_id: str,
    *task_ids: str,
    groups: tuple[GroupSpec, ...] = (),
    at: datetime | None = None,
) -> str | None:
    tasks = tuple((t, f"app.{t}") for t in task_ids)
    return store.dispatch(Dispatch(session_id, tasks, groups, at or utcnow()))


def late(store: SessionStore, session_id: str, *task_ids: str) -> tuple[str, ...]:
    tasks = tuple((t, f"app.{t}") for t in task_ids)
    return store.late_dispatch(Dispatch(session_id, tasks, (), utcnow()))


def run(
    session_id: str,
    task_id: str,
    state: str = "STARTED",
    *,
    attempt: int = 0,
    worker: str | None = NODE,
    started: datetime | None = None,
    finished: datetime | None = None,
    error: str | None = None,
    name: str | None = "app.task",
) -> Run:
    """A run record; a final ``state`` without ``finished`` ends it a second after start."""
    start = started or utcnow()
    if finished is None and state != "STARTED":
        finished = start + timedelta(seconds=1)
    return Run(task_id, attempt, session_id, name, state, worker, start, finished, error)


def statuses_of(store: SessionStore, session_id: str) -> dict[str, TaskStatus]:
    return {t.task_id: t.status for t in store.tasks(session_id)}


def write(
    scope: str, scope_id: str, key: str, value: Any, expected: int | None = None
) -> StateWrite:
    size = 0 if value is MISSING else check_value(key, value)[1]
    return StateWrite(scope, scope_id, key, value, size, expected)


def put(store: SessionStore, session_id: str, key: str, value: Any, limit: int = BIG) -> int:
    return store.state_write(session_id, [write("session", session_id, key, value)], limit)[key]


def rules(
    live: dict[str, Any],
    snapshot: dict[str, Any],
    logs: list[list[Op]],
    policy: str,
    reducers: dict[str, str] | None,
) -> dict[str, Any]:
    """The real merge rules, as ``sessionflow.branches.merger({})`` builds them."""
    return merge_branches(
        live, snapshot, logs, policy=policy, reducers=resolve_reducers(reducers, {})
    )


def race(*calls: Callable[[], Any], timeout: float = 60) -> list[Any]:
    """Run ``calls`` at once in threads (released together); their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def target(index: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout)
            results[index] = call()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=target, args=(i, c), daemon=True) for i, c in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing call hung"
    if errors:
        raise errors[0]
    return results


def close_to(value: datetime | None, expected: datetime, seconds: float = 5.0) -> bool:
    return value is not None and abs((value - expected).total_seconds()) <= seconds


class Contract:
    """Base of the contract's parts: a backend's test class provides ``store``."""

    @pytest.fixture
    def store(self) -> Iterator[SessionStore]:
        raise NotImplementedError("a backend's test class provides an empty store")


def register(
    store: SessionStore,
    nodename: str,
    *,
    pid: int = 11,
    host: str = "host-a",
    max_sessions: int = 10,
    is_alive: Callable[[str | None, int, float], bool] | None = None,
) -> None:
    store.register_worker(
        nodename,
        host=host,
        pid=pid,
        queue=QUEUE if nodename == NODE else f"sf.worker.{nodename}",
        max_sessions=max_sessions,
        is_alive=is_alive or (lambda *_: True),
    )


def never_asked(host: str | None, pid: int, age: float) -> bool:
    raise AssertionError("is_alive must not be asked here")

"""store.py against SQLite (a temp file) and PostgreSQL (a scratch database)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, inspect

from sessionflow import StoreError
from sessionflow import migrate as sf_migrate
from sessionflow.config import Config
from sessionflow.store import (
    CLOSED,
    FAILED,
    OPEN,
    PENDING,
    TASK_CANCELLED,
    TASK_PENDING,
    TASK_STARTED,
    Store,
    utcnow,
)

NODE, QUEUE = "w1@host", "sfunit.worker.w1_host"
PG_RACE_BUG = (
    "BUG: store.Store.admit reads the pending row, then runs "
    "UPDATE ... WHERE status='pending' without checking its rowcount; on PostgreSQL "
    "(READ COMMITTED) an abandon_pending committed in between makes both win "
    "(admit says 'admitted', abandon_pending returns True, the row ends 'failed')"
)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("make_pg_url")()
        Store(Config(database_url=url)).upgrade()
    store = Store(Config(database_url=url))
    yield store
    store.dispose()


def pending(store: Store, **values: Any) -> str:
    session_id = str(uuid.uuid4())
    store.create_pending(
        {
            "id": session_id,
            "created_at": utcnow(),
            "creation_timeout": 10.0,
            "execution_timeout": 600.0,
            **values,
        }
    )
    return session_id


def opened(store: Store, node: str = NODE, cap: int = 100) -> str:
    session_id = pending(store)
    assert store.admit(session_id, node, QUEUE, cap)[0] == "admitted"
    return session_id


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- schema --------------------------------------------------------------------


def test_empty_sqlite_is_migrated_on_first_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    store = Store(Config(database_url=url))
    try:
        assert store.get_status("nothing") is None
        engine = create_engine(url)
        with engine.connect() as conn:
            assert sf_migrate.current_revision(conn) == sf_migrate.head_revision()
        engine.dispose()
        assert {"sf_sessions", "sf_workers", "sf_session_tasks"} <= tables(url)
    finally:
        store.dispose()


def test_sqlite_without_auto_migrate_asks_for_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    store = Store(Config(database_url=url, auto_migrate=False))
    try:
        with pytest.raises(StoreError) as info:
            store.get_status("x")
        assert "sessionflow db upgrade" in str(info.value)
        assert "sf_sessions" not in tables(url)
    finally:
        store.dispose()


def test_postgres_without_upgrade_asks_for_upgrade(make_pg_url: Callable[[], str]) -> None:
    url = make_pg_url()
    store = Store(Config(database_url=url))  # auto_migrate applies to SQLite only
    try:
        with pytest.raises(StoreError) as info:
            store.get_status("x")
        assert "sessionflow db upgrade" in str(info.value)
        assert "sf_sessions" not in tables(url)
    finally:
        store.dispose()


def test_postgres_upgrade_then_use(make_pg_url: Callable[[], str]) -> None:
    url = make_pg_url()
    assert Store(Config(database_url=url)).upgrade() == sf_migrate.head_revision()
    store = Store(Config(database_url=url))
    try:
        session_id = pending(store)
        assert store.get_status(session_id) == PENDING
    finally:
        store.dispose()


def test_unreachable_database_is_a_store_error() -> None:
    store = Store(Config(database_url="postgresql+psycopg://127.0.0.1:1/nothing"))
    with pytest.raises(StoreError, match="cannot reach the session store"):
        store.get_status("x")


def test_missing_driver_is_a_store_error() -> None:
    store = Store(Config(database_url="nosuchdialect://host/db"))
    with pytest.raises(StoreError, match="sessionflow_database_url"):
        store.get_status("x")


# -- conditional updates -------------------------------------------------------


def test_admit_opens_pending_session(store: Store) -> None:
    session_id = pending(store)
    assert store.admit(session_id, NODE, QUEUE, 2) == ("admitted", 1)
    row = store.get_session(session_id)
    assert row is not None
    assert (row["status"], row["hostname"], row["queue"]) == (OPEN, NODE, QUEUE)
    assert row["deadline_at"] > row["opened_at"]


def test_admit_full_at_cap(store: Store) -> None:
    first, second = pending(store), pending(store)
    assert store.admit(first, NODE, QUEUE, 1) == ("admitted", 1)
    assert store.admit(second, NODE, QUEUE, 1) == ("full", 1)
    assert store.get_status(second) == PENDING
    assert store.admit(second, "w2@host", QUEUE, 1) == ("admitted", 1)  # cap is per worker
    assert store.count_open(NODE) == 1


def test_admit_gone_when_not_pending(store: Store) -> None:
    assert store.admit("no-such-session", NODE, QUEUE, 5)[0] == "gone"
    abandoned = pending(store)
    assert store.abandon_pending(abandoned, "creation_timeout")
    assert store.admit(abandoned, NODE, QUEUE, 5) == ("gone", 0)
    assert store.get_status(abandoned) == FAILED
    already = opened(store)
    assert store.admit(already, "w2@host", QUEUE, 5)[0] == "gone"
    row = store.get_session(already)
    assert row is not None and row["hostname"] == NODE


def test_abandon_loses_to_earlier_admission(store: Store) -> None:
    session_id = opened(store)
    assert store.abandon_pending(session_id, "creation_timeout") is False
    assert store.get_status(session_id) == OPEN


def test_abandon_pending_vs_admit_interleaved(request: pytest.FixtureRequest, store: Store) -> None:
    """abandon_pending commits between admit's read and its update: one must lose."""
    session_id = pending(store)
    engine = store._engines()[0]
    abandoned: list[bool] = []
    fired = threading.Event()

    def abandon() -> None:
        abandoned.append(store.abandon_pending(session_id, "creation_timeout"))

    def interleave(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired.is_set() or not statement.lstrip().upper().startswith("UPDATE SF_SESSIONS"):
            return
        if "opened_at" not in statement:
            return
        fired.set()
        racer = threading.Thread(target=abandon)
        racer.start()
        racer.join(0.3)  # SQLite: blocked by admit's BEGIN IMMEDIATE until admit commits

    event.listen(engine, "before_cursor_execute", interleave)
    try:
        outcome, _ = store.admit(session_id, NODE, QUEUE, 5)
    finally:
        event.remove(engine, "before_cursor_execute", interleave)
    deadline = threading.Event()
    while not abandoned and not deadline.wait(0.01):
        pass
    assert fired.is_set() and len(abandoned) == 1
    status = store.get_status(session_id)
    assert (outcome == "admitted") != abandoned[0], (outcome, abandoned, status)
    assert status == (OPEN if outcome == "admitted" else FAILED)


def test_abandon_pending_vs_admit_threads_sqlite(tmp_path: Path) -> None:
    """Real threads on SQLite (on PostgreSQL the outcome is timing-dependent, so the
    interleaved test above pins it down instead)."""
    store = Store(Config(database_url=f"sqlite:///{tmp_path / 'race.db'}"))
    for _ in range(15):
        session_id = pending(store)
        barrier = threading.Barrier(2)
        results: dict[str, Any] = {}

        def admit(
            sid: str = session_id, b: threading.Barrier = barrier, out: dict[str, Any] = results
        ) -> None:
            b.wait()
            out["admit"] = store.admit(sid, NODE, QUEUE, 1000)[0]

        def abandon(
            sid: str = session_id, b: threading.Barrier = barrier, out: dict[str, Any] = results
        ) -> None:
            b.wait()
            out["abandon"] = store.abandon_pending(sid, "creation_timeout")

        threads = [threading.Thread(target=admit), threading.Thread(target=abandon)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert (results["admit"] == "admitted") != results["abandon"], results
        assert store.get_status(session_id) == (OPEN if results["admit"] == "admitted" else FAILED)
    store.dispose()


def test_register_tasks(store: Store) -> None:
    session_id = opened(store)
    assert store.register_tasks(session_id, [("t1", "app.a"), ("t2", None)]) == QUEUE
    assert store.task_states(session_id) == {"t1": TASK_PENDING, "t2": TASK_PENDING}
    row = store.get_session(session_id)
    assert row is not None and row["turns"] == 2


def test_register_tasks_none_once_closed(store: Store) -> None:
    session_id = opened(store)
    assert store.end_session(session_id, CLOSED, "completed") is not None
    assert store.register_tasks(session_id, [("t1", "app.a")]) is None
    assert store.task_states(session_id) == {}
    assert store.register_tasks(pending(store), [("t2", "app.a")]) is None  # not open yet
    assert store.register_tasks("no-such-session", [("t3", "app.a")]) is None


def _cancelled_ids(result: Any) -> list[str]:
    return list(getattr(result, "cancelled", result))


def test_end_session_returns_pending_tasks_exactly_once(store: Store) -> None:
    session_id = opened(store)
    store.register_tasks(session_id, [("t1", "a"), ("t2", "a"), ("t3", "a")])
    assert store.task_started(session_id, "t2", "a", NODE)
    ended = store.end_session(session_id, CLOSED, "completed")
    assert ended is not None
    assert sorted(_cancelled_ids(ended)) == ["t1", "t3"]
    assert store.end_session(session_id, CLOSED, "completed") is None
    assert store.end_session(session_id, FAILED, "worker_lost") is None
    row = store.get_session(session_id)
    assert row is not None and (row["status"], row["reason"]) == (CLOSED, "completed")
    assert store.task_states(session_id) == {
        "t1": TASK_CANCELLED,
        "t2": TASK_STARTED,
        "t3": TASK_CANCELLED,
    }


def test_end_session_from_threads_only_one_wins(store: Store) -> None:
    session_id = opened(store)
    store.register_tasks(session_id, [(f"t{i}", "a") for i in range(5)])
    barrier = threading.Barrier(4)
    results: list[Any] = []
    lock = threading.Lock()

    def end(status: str) -> None:
        barrier.wait()
        result = store.end_session(session_id, status, "race")
        with lock:
            results.append(result)

    threads = [threading.Thread(target=end, args=(s,)) for s in (CLOSED, FAILED, CLOSED, FAILED)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if r is not None]
    assert len(results) == 4 and len(winners) == 1
    assert sorted(_cancelled_ids(winners[0])) == [f"t{i}" for i in range(5)]


def test_task_started_refused_after_end_session(store: Store) -> None:
    session_id = opened(store)
    store.register_tasks(session_id, [("t1", "a")])
    store.end_session(session_id, CLOSED, "completed")
    assert store.task_started(session_id, "t1", "a", NODE) is None
    assert store.task_started(session_id, "unregistered", "a", NODE) is None
    assert store.task_states(session_id) == {"t1": TASK_CANCELLED}


def test_task_started_allowed_while_open(store: Store) -> None:
    session_id = opened(store)
    store.register_tasks(session_id, [("t1", "a")])
    assert store.task_started(session_id, "t1", "a", NODE) == QUEUE
    assert store.task_started(session_id, "adopted", "a", NODE) == QUEUE  # e.g. Task.replace
    assert store.task_states(session_id) == {"t1": TASK_STARTED, "adopted": TASK_STARTED}


def test_task_started_vs_end_session_interleaved(store: Store) -> None:
    """task_started commits while end_session settles tasks: never both started and cancelled."""
    session_id = opened(store)
    store.register_tasks(session_id, [("t1", "a")])
    engine = store._engines()[0]
    started: list[str | None] = []
    fired = threading.Event()
    prefix = "UPDATE SF_SESSION_TASKS"

    def start() -> None:
        started.append(store.task_started(session_id, "t1", "a", NODE))

    def interleave(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = statement.lstrip().upper()
        if fired.is_set() or not text.startswith(prefix) or "STARTED_AT" in text:
            return
        fired.set()
        racer = threading.Thread(target=start)
        racer.start()
        racer.join(0.3)

    event.listen(engine, "before_cursor_execute", interleave)
    try:
        ended = store.end_session(session_id, CLOSED, "completed")
    finally:
        event.remove(engine, "before_cursor_execute", interleave)
    deadline = time.monotonic() + 30
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fired.is_set() and ended is not None and len(started) == 1
    cancelled = "t1" in _cancelled_ids(ended)
    assert cancelled != (started[0] is not None), (cancelled, started)
    state = store.task_states(session_id)["t1"]
    assert state == (TASK_CANCELLED if cancelled else TASK_STARTED)


# -- fork ----------------------------------------------------------------------


def test_engines_never_cross_a_fork(store: Store) -> None:
    parent_session = opened(store)
    store.register_tasks(parent_session, [("p1", "a")])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: use the inherited store, report the new session id
        code = 1
        try:
            os.close(read)
            ok = store.get_status(parent_session) == OPEN
            child_session = opened(store, node="w2@host")
            ok = ok and store.register_tasks(child_session, [("c1", "a")]) == QUEUE
            if ok:
                os.write(write, child_session.encode())
                code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_session = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # the parent's engines still work, and see what the child wrote
    assert store.get_status(child_session) == OPEN
    assert store.task_states(child_session) == {"c1": TASK_PENDING}
    assert store.task_started(parent_session, "p1", "a", NODE) == QUEUE
    assert store.end_session(parent_session, CLOSED, "completed") is not None

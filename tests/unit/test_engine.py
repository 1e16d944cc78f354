"""Engine review findings, each pinned by a test that failed on 0.1 (no worker processes)."""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, states
from kombu.exceptions import EncodeError
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError

from sessionflow import (
    ConfigurationError,
    InvalidArgument,
    Session,
    SessionFlow,
    SessionFlowError,
    StoreError,
)
from sessionflow.celery_ext.live import LiveSessions, claim
from sessionflow.celery_ext.ticker import Ticker
from sessionflow.celery_ext.writer import Writer
from sessionflow.enums import SessionStatus, TaskStatus
from sessionflow.errors import BrokerError
from sessionflow.records import Ended, NewSession, utcnow
from sessionflow.results import Resolver
from sessionflow.store.sql.engine import translated, use_wal


def make_flow(tmp_path: Path) -> SessionFlow:
    app = Celery("enginetest", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.sessionflow_database_url = f"sqlite:///{tmp_path / 'engine.db'}"

    @app.task(name="t.a", shared=False)
    def a(*args: Any) -> Any:
        return args

    return SessionFlow(app)


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[SessionFlow]:
    flow = make_flow(tmp_path)
    yield flow
    flow.close()
    flow.app.close()


def opened(flow: SessionFlow, node: str = "w1@test", **options: Any) -> Session:
    new = NewSession(
        id=str(uuid.uuid4()),
        created_at=utcnow(),
        creation_timeout=5,
        execution_timeout=600,
        **options,
    )
    flow.store.create_pending(new)
    assert flow.store.admit(new.id, node, "q.w1") is not None
    return Session(flow, new.id)


def test_a_finished_task_keeps_its_result_when_its_session_ends(flow: SessionFlow) -> None:
    """0.1: a lost task_finished let a later worker start overwrite SUCCESS with SessionTaskLost."""
    backend = flow.app.backend
    backend.store_result("done-1", {"ok": True}, states.SUCCESS)
    Resolver(flow.app).resolve(
        Ended("s-1", SessionStatus.FAILED, "worker_lost", ("done-1", "never-ran"), ("done-1",))
    )
    assert backend.get_state("done-1") == states.SUCCESS
    assert backend.get_result("done-1") == {"ok": True}
    assert backend.get_state("never-ran") == states.FAILURE


def test_failed_publish_gives_back_turns_tasks_and_groups(flow: SessionFlow) -> None:
    """0.1: a publish that failed left the turns taken and the branch rows behind."""
    s = opened(flow, max_turns=5)
    a = flow.app.tasks["t.a"]
    with pytest.raises(InvalidArgument, match="cannot be serialised") as info:
        s.apply_async(group(a.s(object()), a.s(2)))  # not JSON: kombu refuses to publish
    assert isinstance(info.value.__cause__, EncodeError)
    assert s.info.turns == 0
    assert flow.store.tasks(s.id) == []
    s.apply_async(a, args=(1,))
    assert s.info.turns == 1 and len(flow.store.tasks(s.id)) == 1


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"countdown": "abc"}, "countdown"),
        ({"countdown": math.nan}, "countdown"),
        ({"countdown": 10**400}, "countdown"),
        ({"expires": "tomorrow"}, "expires"),
        ({"eta": 5}, "eta"),
        ({"headers": "x"}, "headers"),
        ({"priority": "high"}, "priority"),
        ({"priority": 300}, "priority"),
        ({"time_limit": math.inf}, "time_limit"),
        # kombu failed on them only while publishing (SerializerNotInstalled, KeyError)
        ({"serializer": "bogus"}, "serializer"),
        ({"compression": "bogus"}, "compression"),
        ({"compression": ["gzip"]}, "compression"),
        ({"retry_policy": "x"}, "retry_policy"),  # TypeError while publishing
    ],
)
@pytest.mark.parametrize("max_turns", [None, 5])
def test_bad_celery_options_are_refused_before_anything_is_counted_or_sent(
    flow: SessionFlow, options: dict[str, Any], named: str, max_turns: int | None
) -> None:
    """Celery failed on them only while publishing, with TypeError or ValueError."""
    s = opened(flow, max_turns=max_turns)
    a = flow.app.tasks["t.a"]
    for send in (lambda: s.apply_async(a, (1,), **options), lambda: s.delay(a.s(1).set(**options))):
        with pytest.raises(InvalidArgument, match=named):
            send()
    flow.registrar.flush()
    assert s.info.turns == 0 and flow.store.tasks(s.id) == []
    s.apply_async(a, (1,), countdown=1, expires=60, priority=3, headers={"h": 1})
    flow.registrar.flush()
    assert s.info.turns == 1


@pytest.mark.parametrize(
    ("obj", "options", "named"),
    [
        ("not a task", {}, "expected a Celery task"),
        (None, {"complete_when_done": "yes"}, "complete_when_done"),
        (None, {"task_id": ""}, "task_id"),
        (None, {"countdown": "soon"}, "countdown"),
    ],
)
def test_apply_async_on_commit_checks_its_arguments_at_the_call(
    flow: SessionFlow, obj: Any, options: dict[str, Any], named: str
) -> None:
    """They were checked only when the transaction committed: the commit raised, and
    the application's later on-commit callbacks were skipped."""
    s = opened(flow)
    with pytest.raises(InvalidArgument, match=named):
        s.apply_async_on_commit(obj or flow.app.tasks["t.a"], (1,), **options)


def test_on_commit_without_django_settings_is_a_configuration_error(flow: SessionFlow) -> None:
    s = opened(flow)  # this process never configures Django's settings
    with pytest.raises(ConfigurationError, match="Django"):
        s.apply_async_on_commit(flow.app.tasks["t.a"], (1,))
    with pytest.raises(ConfigurationError, match="Django"):
        flow.request_session(creation_timeout=5, execution_timeout=5, on_commit=True)


def test_django_setup_of_a_non_app_is_a_configuration_error() -> None:
    """setup("proj.celery:app") raised AttributeError (the path belongs in settings)."""
    from sessionflow.contrib.django.conf import setup

    with pytest.raises(ConfigurationError, match="CELERY_APP"):
        setup("proj.celery:app")  # type: ignore[arg-type]


def test_django_setup_refuses_a_bad_setting_at_once(tmp_path: Path) -> None:
    """A wrong SESSIONFLOW value failed only at the first use of the flow (a request),
    where Flask's extension refuses it at init. Its own process: Django's settings are
    global, and this process never configures them."""
    script = f"""
import django
from django.conf import settings
settings.configure(SESSIONFLOW={{"DATABASE_URL": "sqlite:///{tmp_path}/d.db",
                                 "MAX_CONCURRENT_SESSIONS": 0}})
django.setup()
from celery import Celery
from sessionflow.contrib.django.conf import setup
from sessionflow import ConfigurationError
try:
    setup(Celery("djunit", broker="memory://", set_as_current=False))
except ConfigurationError as exc:
    print("refused:", exc)
else:
    print("accepted")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith("refused:") and "MAX_CONCURRENT_SESSIONS" in out, out


def test_arguments_that_cannot_be_serialised_are_invalid_and_nothing_is_counted(
    flow: SessionFlow,
) -> None:
    s = opened(flow)
    with pytest.raises(InvalidArgument, match="cannot be serialised") as info:
        s.apply_async(flow.app.tasks["t.a"], (object(),))
    assert isinstance(info.value.__cause__, EncodeError)
    flow.registrar.flush()
    assert flow.store.tasks(s.id) == []


@pytest.mark.parametrize("max_turns", [None, 5])
def test_an_empty_chain_is_invalid_and_nothing_is_counted(
    flow: SessionFlow, max_turns: int | None
) -> None:
    """It raised IndexError from Celery's freeze (plain Celery sends nothing)."""
    s = opened(flow, max_turns=max_turns)
    a = flow.app.tasks["t.a"]
    for canvas in (chain(), chain([]), chord([a.s(1)], chain()), group([a.s(1), chain()])):
        with pytest.raises(InvalidArgument, match="empty chain"):
            s.apply_async(canvas)
    flow.registrar.flush()
    assert s.info.turns == 0 and flow.store.tasks(s.id) == []


@pytest.mark.parametrize("max_turns", [None, 5])
def test_sending_while_the_broker_is_down_is_a_broker_error_and_nothing_is_counted(
    tmp_path: Path, max_turns: int | None
) -> None:
    """kombu's OperationalError escaped; the message names the broker, never its password."""
    flow = make_flow(tmp_path)
    flow.app.conf.broker_url = "redis://:pw-never-shown@127.0.0.1:1/0"
    flow.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
    try:
        s = opened(flow, max_turns=max_turns)
        a = flow.app.tasks["t.a"]
        for send in (lambda: s.apply_async(a, (1,)), lambda: s.apply_async(a.s(1) | a.s())):
            with pytest.raises(BrokerError) as info:
                send()
            message = str(info.value)
            assert "redis://:***@127.0.0.1:1/0" in message and "pw-never-shown" not in message
        flow.registrar.flush()
        assert s.info.turns == 0 and flow.store.tasks(s.id) == []
    finally:
        flow.close()
        flow.app.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OperationalError("SELECT 1", {}, Exception("gone")), StoreError),
        (ProgrammingError("SELECT 1", {}, Exception("no such table: sf_sessions")), StoreError),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), StoreError),
        (DataError("INSERT", {}, Exception("value too long")), InvalidArgument),
        (OverflowError("int too large"), InvalidArgument),
        (RecursionError("deep"), InvalidArgument),
    ],
)
def test_every_database_error_becomes_a_sessionflow_error(
    error: Exception, expected: type[Exception]
) -> None:
    """0.1 translated only OperationalError, while callers catch SessionFlowError."""
    with pytest.raises(expected) as info, translated("write"):
        raise error
    assert isinstance(info.value, SessionFlowError)
    assert "SELECT" not in str(info.value) and "INSERT" not in str(info.value)


def test_worker_start_scan_has_an_index(flow: SessionFlow) -> None:
    """0.1: every worker start scanned sf_session_tasks.worker, which had no index."""
    flow.store.get_session("warm-up")
    engine = create_engine(flow.config.database_url)
    try:
        indexes = inspect(engine).get_indexes("sf_runs")
    finally:
        engine.dispose()
    assert any(ix["column_names"] == ["worker"] for ix in indexes)


def _switch_to_wal(path: str, barrier: Any, answers: Any) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    barrier.wait()
    try:
        use_wal(conn.cursor())
        answers.put("ok")
    except sqlite3.Error as exc:
        answers.put(str(exc))


def test_processes_switching_a_fresh_database_to_wal_together_all_succeed(
    tmp_path: Path,
) -> None:
    """Seen in CI: two workers started on a fresh SQLite store at once, and one exited
    with 'database is locked' although busy_timeout was 30 s: SQLite answers a deadlocked
    journal-mode switch at once. A bare PRAGMA failed in about a third of these rounds."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        path = str(tmp_path / f"fresh-{round_}.db")
        barrier, answers = ctx.Barrier(3), ctx.Queue()
        procs = [
            ctx.Process(target=_switch_to_wal, args=(path, barrier, answers)) for _ in range(3)
        ]
        for proc in procs:
            proc.start()
        results = [answers.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert results == ["ok"] * 3, f"round {round_}: {results}"
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            conn.close()


class LockedCursor:
    """A cursor whose first ``locked`` calls fail as a deadlocked switch does."""

    def __init__(self, locked: int, message: str = "database is locked") -> None:
        self.locked, self.message, self.calls = locked, message, 0

    def execute(self, sql: str) -> None:
        self.calls += 1
        if self.calls <= self.locked:
            raise sqlite3.OperationalError(self.message)


def test_wal_switch_retries_a_lock_but_not_other_errors_nor_forever() -> None:
    cursor = LockedCursor(locked=3)
    use_wal(cursor)
    assert cursor.calls == 4
    other = LockedCursor(locked=1, message="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        use_wal(other)
    assert other.calls == 1
    stuck = LockedCursor(locked=10**9)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(stuck, timeout=0.05)
    assert stuck.calls > 1


class FlakyQueues:
    """Queues whose first adoption fails (a broker hiccup)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def adopt(self, session_id: str, queue: str) -> int:
        self.calls.append(session_id)
        if len(self.calls) == 1:
            raise ConnectionError("broker gone for a moment")
        return 3


def test_failed_adoption_is_retried(flow: SessionFlow) -> None:
    """0.1: a failing adoption acked the request and stranded the parked tasks."""
    live = LiveSessions("w1@test", "q.w1", 2, flow.store, Resolver(flow.app), lambda: None)
    flow.__dict__["queues"] = FlakyQueues()
    ticker = Ticker(flow, live)
    try:
        ticker.adopt("moved-1")
        ticker.adopt_parked()
        ticker.adopt_parked()
        ticker.adopt_parked()
        assert flow.queues.calls == ["moved-1", "moved-1"]  # failed, retried once, done
    finally:
        live.remove_dir()


def test_warm_shutdown_ends_sessions_once_from_a_daemon_thread(flow: SessionFlow) -> None:
    """0.1: the SIGTERM handler started a non-daemon thread and ended the sessions twice."""
    live = LiveSessions("w1@test", "q.w1", 2, flow.store, Resolver(flow.app), lambda: None)
    s = opened(flow)
    live.open(flow.store.get_session(s.id))  # type: ignore[arg-type]
    ends: list[str] = []
    live.on_end.append(lambda held, *_: ends.append(held.record.id))
    ticker = Ticker(flow, live)
    before = set(threading.enumerate())
    try:
        ticker.request_shutdown()
        ticker.request_shutdown()
        assert ticker.wait_shutdown(10)
        started = set(threading.enumerate()) - before
        assert all(t.daemon for t in started)
        ticker._end_for_shutdown()  # what the bootstep's stop() runs again
    finally:
        live.remove_dir()
    assert ends == [s.id]
    assert s.info.state.value == "failed" and s.info.reason == "worker_shutdown"
    assert all(t.status is not TaskStatus.PENDING for t in flow.store.tasks(s.id))


def test_a_task_claimed_before_the_end_has_a_start_row_after_it(flow: SessionFlow) -> None:
    """A pool process claimed the task, its start callback had not reached the main
    process when the session ended: the end's flush writes its start, so a sweeper (or
    the worker's restart) can lose it if the worker dies before that callback comes. It
    had no run before, and its caller waited forever after such a kill."""
    writer = Writer(flow.store)
    live = LiveSessions(
        "w1@test",
        "q.w1",
        2,
        flow.store,
        Resolver(flow.app),
        writer.flush,
        claimed=lambda session_id, ids: writer.claimed(session_id, ids, "w1@test"),
    )
    s = opened(flow)
    live.open(flow.store.get_session(s.id))  # type: ignore[arg-type]
    try:
        assert live.arrived(s.id, "t-claimed") and live.arrived(s.id, "t-queued")
        assert claim(live.dir, s.id, "t-claimed")  # in the pool; no callback yet
        assert flow.store.end_session(s.id, SessionStatus.FAILED, "worker_shutdown")
        ended = live.end(s.id)
    finally:
        live.remove_dir()
    assert ended is not None
    tasks = {t.task_id: t.status for t in flow.store.tasks(s.id)}
    assert tasks == {"t-claimed": TaskStatus.STARTED}
    assert [e.lost for e in flow.store.lose_interrupted("w1@test")] == [("t-claimed",)]


def test_sync_asks_the_store_about_ended_sessions_only(flow: SessionFlow) -> None:
    """The ticker's sync bound a thousand ids into one statuses() query every second;
    now it reads the ids the store holds open here and asks only about the others."""
    live = LiveSessions("w1@test", "q.w1", 5, flow.store, Resolver(flow.app), lambda: None)
    held = [opened(flow) for _ in range(3)]
    for s in held:
        live.open(flow.store.get_session(s.id))  # type: ignore[arg-type]
    asked: list[set[str]] = []
    statuses = flow.store.statuses

    def counting(ids: Any) -> Any:
        asked.append(set(ids))
        return statuses(ids)

    flow.store.statuses = counting  # type: ignore[method-assign]
    ticker = Ticker(flow, live)
    try:
        ticker.sync_and_beat()
        assert asked == [] and sorted(live.ids()) == sorted(s.id for s in held)
        assert flow.store.end_session(held[1].id, SessionStatus.CLOSED, "completed")
        ticker.sync_and_beat()
        assert asked == [{held[1].id}]
        assert sorted(live.ids()) == sorted([held[0].id, held[2].id])
        assert live.ended(held[1].id) == ("closed", "completed")
    finally:
        live.remove_dir()

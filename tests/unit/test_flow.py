"""flow.py: argument validation before any write, and SessionFlow(app) installation."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.exceptions import EncodeError
from sqlalchemy import create_engine, func, inspect, select, table

from sessionflow import (
    ConfigurationError,
    InvalidArgument,
    InvalidRecreateToken,
    SessionClosed,
    SessionFlow,
    SessionNotFound,
    SessionState,
    SessionStillPending,
)
from sessionflow.canvas import QUEUE_HEADER, route_session_task
from sessionflow.enums import SessionStatus
from sessionflow.errors import BrokerError
from sessionflow.options import check_reducers
from sessionflow.records import NewSession, utcnow
from sessionflow.tokens import make_token

VALID = {"creation_timeout": 0.5, "execution_timeout": 60}
SECRET = "flow-unit-test-secret-0123456789abcdef"


def make_app(tmp_path: Path, name: str = "flowtest") -> Celery:
    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.sessionflow_database_url = f"sqlite:///{tmp_path / 'flow.db'}"
    app.conf.sessionflow_secret_key = SECRET
    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    app = make_app(tmp_path)
    yield app
    flow = SessionFlow.of(app)
    if flow is not None and "store" in flow.__dict__:
        flow.close()
    app.close()


@pytest.fixture
def flow(app: Celery) -> SessionFlow:
    flow = SessionFlow(app)
    flow.store.get_session("warm-up")  # creates the schema, so row counts are meaningful
    return flow


def row_counts(flow: SessionFlow) -> dict[str, int]:
    engine = create_engine(flow.config.database_url)
    try:
        with engine.connect() as conn:
            names = inspect(conn).get_table_names()
            assert "sf_sessions" in names
            return {
                name: conn.execute(select(func.count()).select_from(table(name))).scalar_one()
                for name in names
            }
    finally:
        engine.dispose()


@pytest.fixture
def unchanged(flow: SessionFlow) -> Iterator[None]:
    """Asserts after the test that no table of the store gained or lost rows."""
    before = row_counts(flow)
    yield
    assert row_counts(flow) == before


BAD_SESSION_OPTIONS: list[tuple[str, Any]] = [
    ("creation_timeout", 0),
    ("creation_timeout", -1),
    ("creation_timeout", "10"),
    ("creation_timeout", True),
    ("creation_timeout", math.nan),
    ("creation_timeout", math.inf),
    ("creation_timeout", None),
    ("execution_timeout", 0),
    ("execution_timeout", "60"),
    ("execution_timeout", math.inf),
    ("heartbeat_timeout", 0),
    ("heartbeat_timeout", 1.5),  # below twice the default heartbeat interval (1 s)
    ("heartbeat_timeout", False),
    ("ttl", 0),
    ("ttl", "1h"),
    ("idle_timeout", -5),
    ("max_turns", 0),
    ("max_turns", True),
    ("max_turns", 1.5),
    ("max_turns", "3"),
    ("survive_restart", "yes"),
    ("survive_restart", 1),
    ("affinity", "medium"),
    ("affinity", None),
    ("merge", "first_write_wins"),
    ("user_id", ""),
    ("user_id", 5),
    ("agent_id", b"agent"),
    ("metadata", [("a", 1)]),
    ("metadata", {"a": object()}),
    ("metadata", {"a": math.nan}),
    ("reducers", "append"),
    ("reducers", {"k": "no-such-reducer"}),
    ("reducers", {1: "append"}),
    ("reducers", {"temp:": "append"}),  # not a usable key
    ("reducers", {"temp:x": "append"}),  # never merged
    # beyond a float's range: math.isfinite raised OverflowError
    ("creation_timeout", 10**400),
    ("ttl", -(10**400)),
    ("constraints", {"mem": [">=", 10**400]}),
]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("name", "value"), BAD_SESSION_OPTIONS)
def test_create_session_rejects_before_writing(flow: SessionFlow, name: str, value: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        flow.create_session(**{**VALID, name: value})
    assert name in str(info.value) or (name == "reducers" and "reducer" in str(info.value))


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        None,
        make_token(b"another-secret" * 3, "s-1", "w1@host"),
        make_token(SECRET.encode(), "no-such-session", "w1@host"),
    ],
)
def test_recreate_session_rejects_bad_tokens(flow: SessionFlow, token: Any) -> None:
    with pytest.raises(InvalidRecreateToken):
        flow.recreate_session(token, **VALID)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(("name", "value"), BAD_SESSION_OPTIONS[::3])
def test_recreate_session_rejects_options_before_writing(
    flow: SessionFlow, name: str, value: Any
) -> None:
    token = make_token(SECRET.encode(), "no-such-session", "w1@host")
    with pytest.raises(InvalidArgument) as info:
        flow.recreate_session(token, **{**VALID, name: value})
    assert not isinstance(info.value, InvalidRecreateToken)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "kwargs",
    [
        {"state": "bogus"},
        {"state": 5},
        {"user_id": ""},
        {"user_id": 7},
        {"hostname": b"w1@host"},
        {"state": "pending"},  # never listed: it used to give [] whatever was pending
        {"state": SessionState.PENDING},
    ],
)
def test_list_sessions_rejects(flow: SessionFlow, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match=next(iter(kwargs))):
        flow.list_sessions(**kwargs)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("session_id", ["", None, 5, b"abc"])
def test_get_session_rejects(flow: SessionFlow, session_id: Any) -> None:
    with pytest.raises(InvalidArgument, match="session_id"):
        flow.get_session(session_id)


@pytest.mark.usefixtures("unchanged")
def test_get_session_unknown_and_pending_not_found(flow: SessionFlow) -> None:
    with pytest.raises(SessionNotFound):
        flow.get_session("no-such-session")


def test_get_session_finds_pending_sessions(flow: SessionFlow) -> None:
    """A session asked for without waiting (request_session) can be looked up and polled."""
    flow.store.create_pending(
        NewSession(id="p-1", created_at=utcnow(), creation_timeout=5.0, execution_timeout=5.0)
    )
    assert flow.get_session("p-1").info.state is SessionState.PENDING
    assert flow.list_sessions() == []  # lists show sessions a worker took


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("", max),
        (None, max),
        (5, max),
        ("append", max),
        ("sum", max),
        ("mine", "max"),
        ("r" * 65, max),  # stored with each session that names it
        ("a\x00b", max),
    ],
)
def test_register_reducer_rejects(flow: SessionFlow, name: Any, function: Any) -> None:
    with pytest.raises(InvalidArgument):
        flow.register_reducer(name, function)
    assert name not in flow.reducers or name in ("append", "sum")


def test_registered_reducer_is_accepted_in_options(flow: SessionFlow) -> None:
    with pytest.raises(InvalidArgument, match="unknown reducer"):
        check_reducers({"k": "longest"}, flow.reducers)
    flow.register_reducer("longest", lambda a, b: max(a, b, key=len))
    assert check_reducers({"k": "longest", "n": "sum"}, flow.reducers) == {
        "k": "longest",
        "n": "sum",
    }


# -- SessionFlow(app) -----------------------------------------------------------


def routes(app: Celery) -> tuple[Any, ...]:
    value = app.conf.task_routes
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def session_route(app: Celery, queue: str = "sfq.worker.w1") -> Any:
    return app.amqp.router.route({"headers": {QUEUE_HEADER: queue}}, "t.any", (), {})


def max_session_options(app: Celery) -> int:
    return sum("--max-sessions" in option.opts for option in app.user_options["worker"])


@pytest.mark.parametrize("app", [None, "proj.celery:app", object()])
def test_of_a_non_app_is_invalid(app: Any) -> None:
    with pytest.raises(InvalidArgument, match="Celery app"):
        SessionFlow.of(app)


def test_not_an_app() -> None:
    with pytest.raises(InvalidArgument, match="Celery app"):
        SessionFlow("proj.celery:app")  # type: ignore[arg-type]


def test_idempotent(app: Celery) -> None:
    first = SessionFlow(app)
    second = SessionFlow(app)
    assert first is second
    assert SessionFlow.of(app) is first
    assert routes(app).count(route_session_task) == 1
    assert max_session_options(app) == 1
    app.finalize()
    assert SessionFlow(app) is first
    assert routes(app).count(route_session_task) == 1
    assert session_route(app)["queue"].name == "sfq.worker.w1"


def test_of_without_flow(tmp_path: Path) -> None:
    assert SessionFlow.of(make_app(tmp_path, "bare")) is None


def test_existing_dict_routes_kept(app: Celery) -> None:
    app.conf.task_routes = {"t.special": {"queue": "special"}}
    flow = SessionFlow(app)
    assert SessionFlow(app) is flow
    assert routes(app).count(route_session_task) == 1
    assert {"t.special": {"queue": "special"}} in routes(app)
    assert session_route(app)["queue"].name == "sfq.worker.w1"
    special = app.amqp.router.route({}, "t.special", (), {})
    assert special["queue"].name == "special"


def test_router_cache_flushed(app: Celery) -> None:
    assert (
        app.amqp.router.route({"headers": {QUEUE_HEADER: "q1"}}, "t.any", (), {})["queue"].name
        != "q1"
    )  # no session router yet: the default queue
    SessionFlow(app)
    assert session_route(app, "q1")["queue"].name == "q1"


def test_routes_reassigned_after_install(app: Celery) -> None:
    app.finalize()
    flow = SessionFlow(app)
    app.conf.task_routes = {"t.special": {"queue": "special"}}
    assert SessionFlow(app) is flow
    assert routes(app).count(route_session_task) == 1
    assert session_route(app)["queue"].name == "sfq.worker.w1"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("on_commit", ["yes", 1, None])
def test_request_session_rejects_an_on_commit_that_is_no_hook(
    flow: SessionFlow, on_commit: Any
) -> None:
    with pytest.raises(InvalidArgument, match="on_commit must be"):
        flow.request_session(creation_timeout=1, execution_timeout=1, on_commit=on_commit)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("name", "value"),
    [("target_worker", ["w@host"]), ("target_worker", "w@host"), ("recreated_from", "s-1")],
)
def test_request_session_refuses_the_options_only_recreate_sets(
    flow: SessionFlow, name: str, value: Any
) -> None:
    # A list here used to be taken, then failed every later registrar flush of the
    # process (get_session and complete() of valid sessions raised StoreError).
    options = {"creation_timeout": 5, "execution_timeout": 5, name: value}
    with pytest.raises(InvalidArgument, match=name):
        flow.request_session(**options)
    with pytest.raises(InvalidArgument, match=name):
        asyncio.run(flow.create_session_async(**options))
    assert flow.registrar.pending() == 0


@pytest.mark.parametrize("timeout", ["5", [1], math.nan, -1, math.inf, True])
def test_waiting_for_a_request_checks_its_timeout(flow: SessionFlow, timeout: Any) -> None:
    ask = flow.request_session(creation_timeout=5, execution_timeout=5)
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="timeout"):
        ask.wait(timeout)
    with pytest.raises(InvalidArgument, match="timeout"):
        asyncio.run(ask.wait_async(timeout))
    assert time.monotonic() - started < 2  # refused, not waited on (nan waited 5 s)
    assert flow.get_session(ask.id).info.state is SessionState.PENDING


def open_in_store(flow: SessionFlow) -> str:
    ask = flow.request_session(creation_timeout=30, execution_timeout=600)
    flow.registrar.flush(ask.id)
    assert flow.store.admit(ask.id, "w@nowhere", "q") is not None
    return ask.id


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("<id>", SessionStatus.OPEN, "x"), "closed or failed"),
        (("<id>", "open", "x"), "closed or failed"),
        (("<id>", "bogus", "x"), "closed or failed"),
        (("<id>", None, "x"), "closed or failed"),
        (("<id>", SessionStatus.CLOSED, None), "reason"),
        (("<id>", SessionStatus.CLOSED, ""), "reason"),
        (("<id>", SessionStatus.CLOSED, "r" * 65), "reason"),
        (([1], SessionStatus.CLOSED, "x"), "session_id"),
        (("", SessionStatus.CLOSED, "x"), "session_id"),
    ],
)
def test_end_session_checks_its_arguments(
    flow: SessionFlow, args: tuple[Any, Any, Any], named: str
) -> None:
    session_id = open_in_store(flow)
    call = [session_id if a == "<id>" else a for a in args]
    with pytest.raises(InvalidArgument, match=named):
        flow.end_session(*call)
    record = flow.store.get_session(session_id)
    assert record is not None and record.status is SessionStatus.OPEN
    assert (record.closed_at, record.reason) == (None, None)


def test_end_session_takes_the_status_as_its_value(flow: SessionFlow) -> None:
    session_id = open_in_store(flow)
    flow._tell_owner = lambda *_: True  # type: ignore[method-assign]
    assert flow.end_session(session_id, "failed", "operator") is True
    info = flow.get_session(session_id).info
    assert (info.state, info.reason) == (SessionState.FAILED, "operator")


def test_request_session_on_commit_hook_asks_only_when_called(flow: SessionFlow) -> None:
    hooks: list[Any] = []
    ask = flow.request_session(creation_timeout=5, execution_timeout=5, on_commit=hooks.append)
    assert len(hooks) == 1 and not flow.registrar.has_session(ask.id)  # nothing asked yet
    hooks[0]()  # the transaction commits
    assert flow.registrar.has_session(ask.id) or flow.store.get_session(ask.id) is not None


def test_get_session_waits_for_the_pending_row_being_written(
    flow: SessionFlow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registrar's thread may be writing the row when get_session looks (seen in CI
    as SessionNotFound): get_session must wait for that write, not miss it."""
    entered, release = threading.Event(), threading.Event()
    real = flow.store.create_pending

    def slow(new: NewSession) -> bool:
        entered.set()
        release.wait(10)
        return real(new)

    monkeypatch.setattr(flow.store, "create_pending", slow)
    ask = flow.request_session(creation_timeout=30, execution_timeout=30)
    assert entered.wait(10)  # the background thread is in the middle of the write
    threading.Timer(0.3, release.set).start()
    assert flow.get_session(ask.id).info.state is SessionState.PENDING


def test_complete_ends_a_session_nobody_admitted_yet(flow: SessionFlow) -> None:
    """complete() on a requested, not yet admitted session ends it: a worker freed later
    must not open it (it would hold a slot until execution_timeout), and a waiting
    handle learns it was closed instead of waiting on."""
    ask = flow.request_session(creation_timeout=30, execution_timeout=600)
    flow.get_session(ask.id).complete()
    info = flow.get_session(ask.id).info
    assert (info.state, info.reason) == (SessionState.CLOSED, "completed")
    assert flow.store.admit(ask.id, "late@worker", "q") is None  # no worker opens it now
    with pytest.raises(SessionClosed):
        ask.wait(timeout=1)
    flow.get_session(ask.id).complete()  # safe to call again
    assert flow.get_session(ask.id).info.state is SessionState.CLOSED


def test_a_request_ended_before_any_worker_took_it_stops_its_wait_at_once(
    tmp_path: Path,
) -> None:
    """wait() waits for the creation reply in the result backend: complete() of the
    still-pending session sent none, so wait() blocked until creation_timeout."""
    app = make_app(tmp_path, "replytest")
    app.conf.result_backend = "cache+memory://"
    flow = SessionFlow(app)
    try:
        ask = flow.request_session(creation_timeout=30, execution_timeout=600)
        ended = threading.Timer(0.3, lambda: flow.get_session(ask.id).complete())
        ended.start()
        started = time.monotonic()
        with pytest.raises(SessionClosed):
            ask.wait()
        assert time.monotonic() - started < 10
        ended.join()
    finally:
        flow.close()
        app.close()


def test_sending_to_a_session_no_worker_took_yet_says_so(flow: SessionFlow) -> None:
    """It raised SessionNotFound ("no session in the store") though get_session finds it."""
    ask = flow.request_session(creation_timeout=30, execution_timeout=600)
    flow.get_session(ask.id)

    @flow.app.task(name="t.pending_add", shared=False)  # type: ignore[untyped-decorator]
    def add() -> None:
        return None

    with pytest.raises(SessionStillPending, match="still waiting for a worker"):
        ask.session.apply_async(add)
    assert flow.registrar.pending() == 0 and flow.store.tasks(ask.id) == []


def test_complete_of_a_session_admitted_meanwhile_ends_it_as_open(flow: SessionFlow) -> None:
    """A worker admits the session between complete()'s read and its write: the session
    is ended as an open one (its worker is told), not left open."""
    ask = flow.request_session(creation_timeout=30, execution_timeout=600)
    flow.registrar.flush(ask.id)
    real = flow.store.abandon_pending

    def admitted_first(session_id: str, reason: str, **kwargs: Any) -> bool:
        assert flow.store.admit(session_id, "w@nowhere", "q") is not None
        return real(session_id, reason, **kwargs)

    flow.store.abandon_pending = admitted_first  # type: ignore[method-assign]
    try:
        assert flow.end_session(ask.id, SessionStatus.CLOSED, "completed") is True
    finally:
        del flow.store.abandon_pending
    assert flow.get_session(ask.id).info.state is SessionState.CLOSED


def test_complete_ends_a_session_that_is_moving_to_another_worker(flow: SessionFlow) -> None:
    """Its worker died and the session waits for another one (soft affinity): complete()
    ends it then and there; no worker takes it over later."""
    ask = flow.request_session(creation_timeout=30, execution_timeout=600, affinity="soft")
    flow.registrar.flush(ask.id)
    assert flow.store.admit(ask.id, "gone@host", "q-gone") is not None
    assert flow.store.begin_move(ask.id, "gone@host") is not None
    assert flow.store.get_session(ask.id).moving  # type: ignore[union-attr]
    flow.get_session(ask.id).complete()
    info = flow.get_session(ask.id).info
    assert (info.state, info.reason) == (SessionState.CLOSED, "completed")
    assert flow.store.admit(ask.id, "new@host", "q-new") is None


@pytest.mark.parametrize("backend", ["rpc://", "rpc"])
def test_the_rpc_result_backend_is_refused_with_what_to_use(app: Celery, backend: str) -> None:
    # rpc:// can answer only the caller of a task the worker runs: results for tasks lost
    # with a dead worker failed to store ("RPC backend missing task request") and their
    # callers' .get() hung; every creation waited its whole creation_timeout.
    app.conf.result_backend = backend
    flow = SessionFlow(app)
    for call in (
        lambda: flow.config,
        lambda: flow.create_session(**VALID),
        lambda: flow.request_session(**VALID),
    ):
        with pytest.raises(ConfigurationError, match="rpc") as info:
            call()
        assert "redis://" in str(info.value)


@pytest.mark.parametrize("backend", [None, "cache+memory://"])
def test_backends_that_store_by_task_id_are_taken(app: Celery, backend: str | None) -> None:
    app.conf.result_backend = backend
    assert SessionFlow(app).config.max_concurrent_sessions == 1000


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("placed", [{}, {"requires": {"gpu": 1}}])
def test_request_session_refuses_an_on_open_that_cannot_be_serialised(
    flow: SessionFlow, placed: dict[str, Any]
) -> None:
    """kombu's EncodeError escaped after the pending row was queued: an orphan row."""

    @flow.app.task(name="t.start_job", shared=False)  # type: ignore[untyped-decorator]
    def start_job(session_id: str, x: Any) -> None:
        return None

    with pytest.raises(InvalidArgument, match="on_open") as info:
        flow.request_session(**VALID, **placed, on_open=start_job.s({1, 2}))
    assert isinstance(info.value.__cause__, EncodeError)
    assert flow.registrar.pending() == 0
    flow.registrar.flush()  # nothing queued for the store either (unchanged: no row)


def test_asking_for_a_session_while_the_broker_is_down_is_a_broker_error(
    tmp_path: Path,
) -> None:
    """kombu's OperationalError escaped after 6 s, and request_session left a pending row
    behind. The message names the broker, never its password."""
    app = make_app(tmp_path, "brokerdown")
    app.conf.broker_url = "redis://:pw-never-shown@127.0.0.1:1/0"
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
    flow = SessionFlow(app)
    flow.store.get_session("warm-up")  # creates the schema
    try:
        for ask in (
            lambda: flow.request_session(creation_timeout=30, execution_timeout=60),
            lambda: flow.create_session(creation_timeout=30, execution_timeout=60),
        ):
            started = time.monotonic()
            with pytest.raises(BrokerError) as info:
                ask()
            assert time.monotonic() - started < 3
            message = str(info.value)
            assert "redis://:***@127.0.0.1:1/0" in message and "pw-never-shown" not in message
        assert flow.registrar.pending() == 0
        flow.registrar.flush()
        assert row_counts(flow)["sf_sessions"] == 0
    finally:
        flow.close()
        app.close()

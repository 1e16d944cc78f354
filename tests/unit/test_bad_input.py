"""Every public entry point, fed arbitrary text and JSON on both stores: it succeeds or raises
a SessionFlowError, and a call that fails leaves every table as it was."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, func, inspect, select, table
from test_state_store import STORES, scratch_url

from sessionflow import Session, SessionFlow, SessionFlowError
from sessionflow.records import NewSession, utcnow

# Text of every kind: NUL, lone surrogates, very long, empty.
TEXT = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec=None), max_size=20),
    st.text(min_size=250, max_size=400),
    st.sampled_from(["", "\x00", "a\x00b", "\ud800", "x" * 256, "x" * 10_000]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
DEEP = st.integers(min_value=1, max_value=10_000).map(lambda n: _nest(n))
VALUES = st.one_of(JSON, DEEP, st.integers(min_value=-(2**80), max_value=2**80))
NUMBERS = st.one_of(st.integers(min_value=-(10**31), max_value=10**31), st.floats(), st.none())
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _nest(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture(scope="module", params=STORES)
def flow(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SessionFlow]:
    with scratch_url(request.param, tmp_path_factory.mktemp("bad")) as url:
        app = Celery(
            "badinput", broker="memory://", backend="cache+memory://", set_as_current=False
        )
        app.conf.sessionflow_database_url = url
        app.conf.sessionflow_secret_key = "bad-input-tests-secret-key-0123456789"

        @app.task(name="t.noop", shared=False)
        def noop(*args: Any) -> None:
            return None

        flow = SessionFlow(app)
        if url.startswith("postgresql"):
            flow.store.upgrade()

        # An in-process "worker": admit at once, so creation does not wait for one.
        def admit_now(session_id: str, *_: Any, new: Any = None, **__: Any) -> None:
            if new is not None:
                flow.store.open_new(new, "w@test", "q")

        flow.request_admission = admit_now  # type: ignore[method-assign]
        flow._await_admission = lambda *_: True  # type: ignore[method-assign]
        yield flow
        flow.close()
        app.close()
        engine = _ENGINES.pop(url, None)
        if engine is not None:
            engine.dispose()


@pytest.fixture(scope="module")
def session(flow: SessionFlow) -> Session:
    new = NewSession(
        id=str(uuid.uuid4()),
        created_at=utcnow(),
        creation_timeout=5,
        execution_timeout=600,
        user_id="u",
    )
    flow.store.create_pending(new)
    flow.store.admit(new.id, "w@test", "q")
    return Session(flow, new.id)


_ENGINES: dict[str, Engine] = {}


def counts(flow: SessionFlow) -> dict[str, int]:
    url = flow.config.database_url
    engine = _ENGINES.get(url) or _ENGINES.setdefault(url, create_engine(url))
    with engine.connect() as conn:
        return {
            name: conn.execute(select(func.count()).select_from(table(name))).scalar_one()
            for name in inspect(conn).get_table_names()
        }


def check(flow: SessionFlow, call: Callable[[], Any]) -> None:
    """``call`` succeeds, or raises a SessionFlowError and changes no table."""
    flow.registrar.flush()  # registrations of earlier calls land before we count
    before = counts(flow)
    try:
        call()
    except SessionFlowError:
        flow.registrar.flush()
        assert counts(flow) == before
    except KeyError:  # state[key] of a missing key: the Mapping contract
        assert counts(flow) == before


@SETTINGS
@given(
    user_id=st.one_of(st.none(), TEXT),
    agent_id=st.one_of(st.none(), TEXT),
    metadata=st.one_of(st.none(), VALUES),
)
def test_create_session(flow: SessionFlow, user_id: Any, agent_id: Any, metadata: Any) -> None:
    check(
        flow,
        lambda: flow.create_session(
            creation_timeout=1,
            execution_timeout=60,
            user_id=user_id,
            agent_id=agent_id,
            metadata=metadata,
        ).complete(),
    )


@SETTINGS
@given(value=st.one_of(TEXT, NUMBERS), other=TEXT)
def test_lookups(flow: SessionFlow, value: Any, other: Any) -> None:
    check(flow, lambda: flow.get_session(value))
    check(flow, lambda: flow.list_sessions(state=value))
    check(flow, lambda: flow.list_sessions(user_id=value, hostname=other))
    check(flow, lambda: flow.recreate_session(value, creation_timeout=1, execution_timeout=1))


@SETTINGS
@given(key=TEXT, value=VALUES, by=NUMBERS)
def test_state(flow: SessionFlow, session: Session, key: Any, value: Any, by: Any) -> None:
    state = session.state
    check(flow, lambda: state.set(key, value))
    check(flow, lambda: state.get(key))
    check(flow, lambda: state.update({key: value}))
    check(flow, lambda: state.increment(key, by))
    check(flow, lambda: state.append(key, value))
    check(flow, lambda: state.delete(key))


@SETTINGS
@given(limit=NUMBERS, task_id=TEXT)
def test_history_and_dispatch(
    flow: SessionFlow, session: Session, limit: Any, task_id: Any
) -> None:
    check(flow, lambda: session.history(limit=limit))
    check(flow, lambda: session.compact(keep_last=limit))
    check(flow, lambda: session.apply_async(flow.app.tasks["t.noop"], task_id=task_id))

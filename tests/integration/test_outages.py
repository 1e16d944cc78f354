"""Service outages under open sessions: the broker and the database restart.

These restart the machine's Redis, RabbitMQ and PostgreSQL services, so they
run only on the stacks that use them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from harness import Stack, restart_broker, start_postgres, stop_postgres, wait_until
from sessionflow import SessionFlow, SessionState, StoreError
from sessionflow.enums import SessionStatus, TaskStatus

pytestmark = pytest.mark.integration
GET = 30


def task(stack: Stack, name: str) -> Any:
    return stack.app.tasks[f"sfapp.{name}"]


@pytest.mark.only_stacks(brokers=("redis", "amqp"))
def test_broker_restart_keeps_sessions_open(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    opened = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(2)]
    hosts = [s.info.hostname for s in opened]
    assert [s.apply_async(where, args=(0,)).get(timeout=GET)["hostname"] for s in opened] == hosts
    restart_broker(stack.spec.broker)

    def takes_work() -> bool:
        try:
            results = [s.apply_async(where, args=(1,)).get(timeout=5) for s in opened]
        except Exception:  # reconnecting
            return False
        return [r["hostname"] for r in results] == hosts

    wait_until(takes_work, 90, "the sessions to take work after the broker restart", 1.0)
    assert [s.info.state for s in opened] == [SessionState.OPEN] * 2
    assert [s.info.hostname for s in opened] == hosts
    # New sessions are admitted after the reconnect too.
    with flow.create_session(creation_timeout=30, execution_timeout=600) as fresh:
        assert fresh.apply_async(where, args=(2,)).get(timeout=GET)["session"] == fresh.id
    for s in opened:
        s.complete()


@pytest.mark.only_stacks(stores=("postgres",))
def test_postgres_restart(stack: Stack, flow: SessionFlow) -> None:
    where, sleep = task(stack, "where"), task(stack, "sleep")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    hostname = s.info.hostname
    early = s.apply_async(sleep, args=(0.5,))
    stop_postgres()
    try:
        for call in (
            lambda: flow.create_session(creation_timeout=2, execution_timeout=10),
            lambda: s.info,
            lambda: s.apply_async(where, args=(1,)),
            lambda: s.complete(),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as err:
                call()
            assert time.monotonic() - started < 15
            assert "database" in str(err.value) or "store" in str(err.value)
        time.sleep(3)
    finally:
        start_postgres()
    # The task sent before the outage ran once the store was back.
    assert early.get(timeout=60) == 0.5
    wait_until(lambda: _works(s, where), 60, "the session to work again", 0.5)
    assert s.info.state is SessionState.OPEN and s.info.hostname == hostname
    with flow.create_session(creation_timeout=30, execution_timeout=600) as fresh:
        assert fresh.apply_async(where, args=(3,)).get(timeout=GET)["session"] == fresh.id
    s.complete()
    _assert_consistent(flow)


def _works(session: Any, where: Any) -> bool:
    try:
        return bool(session.apply_async(where, args=(2,)).get(timeout=5)["session"] == session.id)
    except Exception:
        return False


def _assert_consistent(flow: SessionFlow) -> None:
    """No session or task is left half-updated: every ended session gets settled."""
    store = flow.store
    wait_until(lambda: not store.unsettled(), 30, "every ended session to be settled")
    for record in store.list_sessions():
        if record.status is SessionStatus.OPEN:
            assert record.hostname and record.queue and record.closed_at is None, record
        elif record.status.ended:
            assert record.closed_at is not None and record.reason, record
            pending = [t for t in store.tasks(record.id) if t.status is TaskStatus.PENDING]
            assert not pending, (record.id, pending)

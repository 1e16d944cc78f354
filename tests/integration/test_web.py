"""Sessions for web apps: asked for without waiting, ended when their work ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from celery import chain, group

from harness import Stack, wait_until
from sessionflow import (
    SessionClosed,
    SessionCreationTimeout,
    SessionFlow,
    SessionState,
    SessionStillPending,
)

pytestmark = pytest.mark.integration
GET = 30


def task(stack: Stack, name: str) -> Any:
    return stack.app.tasks[f"sfapp.{name}"]


def test_request_session_answers_at_once_and_is_found_pending(
    stack: Stack, flow: SessionFlow
) -> None:
    full = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(4)]
    try:
        started = time.monotonic()
        request = flow.request_session(
            creation_timeout=30, execution_timeout=600, on_open=task(stack, "opened").s()
        )
        assert time.monotonic() - started < 1.0  # it does not wait for a worker
        pending = flow.get_session(request.id)  # found at once, from this process…
        assert pending.info.state is SessionState.PENDING
        out = stack.run_client(  # …and from another one
            "from sessionflow import SessionFlow\n"
            f"print(SessionFlow(app).get_session({request.id!r}).info.state.value)\n"
        )
        assert out.split() == ["pending"]
        with pytest.raises(SessionStillPending):
            request.wait(timeout=0.5)
        assert not request.done()
        full.pop().complete()  # a slot frees: a worker takes the request
        session = request.wait()
        assert session.info.state is SessionState.OPEN and request.done()
        marker = stack.root / "data" / f"opened-{request.id}"
        wait_until(marker.exists, GET, "on_open to run with the session id")
        where = task(stack, "where")
        assert session.apply_async(where, args=(1,)).get(timeout=GET)["session"] == request.id
        session.complete()
    finally:
        for s in full:
            s.complete()


def test_a_request_completed_before_a_worker_took_it_never_opens(
    stack: Stack, flow: SessionFlow
) -> None:
    """A web view asks for a session, then its user leaves: complete() ends the request,
    and the slot that frees later is not taken by it (it would be held until
    execution_timeout)."""
    full = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(4)]
    try:
        request = flow.request_session(
            creation_timeout=30, execution_timeout=600, on_open=task(stack, "opened").s()
        )
        flow.get_session(request.id).complete()
        with pytest.raises(SessionClosed):
            request.wait(timeout=GET)
        full.pop().complete()  # a slot frees: a worker reads the request and drops it
        after = flow.create_session(creation_timeout=30, execution_timeout=60)
        time.sleep(1.0)
        assert flow.get_session(request.id).info.state is SessionState.CLOSED
        assert not (stack.root / "data" / f"opened-{request.id}").exists()
        assert request.id not in {s.id for s in flow.list_sessions(state="open")}
        after.complete()
    finally:
        for s in full:
            s.complete()


def test_a_request_nobody_takes_fails_on_time(stack: Stack, flow: SessionFlow) -> None:
    full = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(4)]
    try:
        request = flow.request_session(creation_timeout=1.5, execution_timeout=60)
        with pytest.raises(SessionCreationTimeout):
            request.wait()
        assert flow.get_session(request.id).info.state is SessionState.FAILED
        # Nobody waits for this one: the sweeper fails it when its time is up.
        orphan = flow.request_session(creation_timeout=1.5, execution_timeout=60)
        wait_until(
            lambda: flow.get_session(orphan.id).info.state is SessionState.FAILED,
            15,
            "the unattended request to fail",
        )
        assert flow.get_session(orphan.id).info.reason == "creation_timeout"
    finally:
        for s in full:
            s.complete()
    time.sleep(1.0)  # freed workers must not open either of them late
    assert flow.get_session(orphan.id).info.state is SessionState.FAILED


def test_create_session_async(stack: Stack, flow: SessionFlow) -> None:
    async def two_at_once() -> list[Any]:
        return list(
            await asyncio.gather(
                flow.create_session_async(creation_timeout=30, execution_timeout=600),
                flow.create_session_async(creation_timeout=30, execution_timeout=600),
            )
        )

    sessions = asyncio.run(two_at_once())
    assert {s.info.state for s in sessions} == {SessionState.OPEN}
    for s in sessions:
        s.complete()


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_complete_when_done(stack: Stack, flow: SessionFlow, outcome: str) -> None:
    where, fail = task(stack, "where"), task(stack, "fail")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    last = where.s() if outcome == "success" else fail.si()
    result = s.apply_async(
        chain(where.s(1), group(where.s(), where.s()), last), complete_when_done=True
    )
    if outcome == "success":
        assert result.get(timeout=GET)["session"] == s.id
    else:
        with pytest.raises(ValueError):  # the failure still reaches the caller
            result.get(timeout=GET)
    wait_until(lambda: s.info.state is SessionState.CLOSED, GET, "the session to complete")
    assert s.info.reason == "completed"
    with pytest.raises(SessionClosed):
        s.apply_async(where, args=(2,))


def test_eager_mode_is_refused_with_a_pointer(stack: Stack, flow: SessionFlow) -> None:
    from sessionflow import ConfigurationError

    stack.app.conf.task_always_eager = True
    try:
        with pytest.raises(ConfigurationError, match=r"sessionflow\.testing"):
            flow.create_session(creation_timeout=1, execution_timeout=1)
        with pytest.raises(ConfigurationError, match=r"sessionflow\.testing"):
            flow.request_session(creation_timeout=1, execution_timeout=1)
    finally:
        stack.app.conf.task_always_eager = False

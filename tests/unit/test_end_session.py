"""flow.end_session when someone else ended the session first: the second caller gets
the first one's guarantee (no task of the session starts once it returns) without
telling the owner again, and without waiting on an owner that is gone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from store_contract.helpers import NODE, QUEUE, T0, opened

from sessionflow import SessionFlow, ops
from sessionflow.enums import SessionStatus
from sessionflow.store.memory import MemoryStore

CLOSED = SessionStatus.CLOSED


class Call(threading.Thread):
    """``function(*args)`` in a thread; ``done`` is set when it has returned."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.function, self.args = function, args
        self.done = threading.Event()
        self.value: Any = None
        self.start()

    def run(self) -> None:
        self.value = self.function(*self.args)
        self.done.set()


@pytest.fixture
def now() -> list[datetime]:
    return [T0]


@pytest.fixture
def told() -> list[str]:
    """The owners a control command was sent to (none answers)."""
    return []


@pytest.fixture
def flow(now: list[datetime], told: list[str]) -> Iterator[SessionFlow]:
    """A client of one worker, NODE, whose last heartbeat was at T0 (the store's clock)."""
    app = Celery("endtest", broker="memory://", set_as_current=False)
    flow = SessionFlow(app)
    flow.__dict__["store"] = MemoryStore(clock=lambda: now[0])
    flow.store.register_worker(
        NODE, host="h", pid=1, queue=QUEUE, max_sessions=4, is_alive=lambda *_: True
    )
    flow._tell_owner = lambda owner, _: told.append(owner) or False  # type: ignore[method-assign]
    yield flow
    flow.close()
    app.close()


def ended_elsewhere(flow: SessionFlow, now: list[datetime]) -> str:
    """An open session on NODE that another process has just ended in the store."""
    session_id = opened(flow.store)
    now[0] += timedelta(seconds=0.5)
    assert flow.store.end_session(session_id, CLOSED, "completed")
    return session_id


def test_a_second_end_returns_once_the_owner_has_settled_the_first(
    flow: SessionFlow, now: list[datetime]
) -> None:
    """The second caller returned at once, while the owner was still being told."""
    session_id = opened(flow.store)
    now[0] += timedelta(seconds=0.5)  # the owner's last heartbeat is older than the end
    heard, reply = threading.Event(), threading.Event()
    told: list[str] = []

    def tell(owner: str, sid: str) -> bool:  # the owner hears of the end, settles, answers
        told.append(owner)
        heard.set()
        reply.wait(10)
        flow.store.settle(sid)
        return True

    flow._tell_owner = tell  # type: ignore[method-assign]
    first = Call(flow.end_session, session_id, CLOSED, "completed")
    assert heard.wait(10)  # the end is in the store, the owner has not applied it yet
    second = Call(flow.end_session, session_id, CLOSED, "completed")
    assert not second.done.wait(0.5), "returned before the owner had applied the end"
    reply.set()
    assert second.done.wait(5) and second.value is False
    assert first.done.wait(5) and first.value is True
    assert told == [NODE]  # once: the second caller only waited


def test_a_second_end_returns_once_the_owner_beats_after_the_end(
    flow: SessionFlow, now: list[datetime], told: list[str]
) -> None:
    """The one who ended it never told the owner (it died, its broadcast got lost): the
    owner's ticker applies the end before its next heartbeat. The second caller does not
    tell the owner again."""
    session_id = ended_elsewhere(flow, now)
    second = Call(flow.end_session, session_id, CLOSED, "completed")
    assert not second.done.wait(0.5)
    now[0] += timedelta(seconds=0.5)
    flow.store.heartbeat(NODE)  # stamped after the end: the owner has applied it
    assert second.done.wait(5) and second.value is False
    assert told == []


def test_a_second_end_does_not_wait_on_a_silent_owner(
    flow: SessionFlow, now: list[datetime]
) -> None:
    """A dead owner's sessions are settled by a sweeper: nothing to wait for."""
    session_id = ended_elsewhere(flow, now)
    now[0] += timedelta(seconds=3 * flow.config.heartbeat_interval + 2)
    started = time.monotonic()
    assert flow.end_session(session_id, CLOSED, "completed") is False
    assert time.monotonic() - started < 1


def test_a_second_end_of_a_settled_session_returns_at_once(
    flow: SessionFlow, now: list[datetime]
) -> None:
    session_id = ended_elsewhere(flow, now)
    flow.store.settle(session_id)
    started = time.monotonic()
    assert flow.end_session(session_id, CLOSED, "completed") is False
    assert time.monotonic() - started < 1


def test_a_second_end_in_the_owner_process_settles_there(
    flow: SessionFlow, now: list[datetime], told: list[str]
) -> None:
    session_id = ended_elsewhere(flow, now)
    ends: list[str] = []
    flow.live = SimpleNamespace(in_this_process=lambda: True, end=ends.append)
    flow.worker_nodename = NODE
    assert flow.end_session(session_id, CLOSED, "completed") is False
    assert ends == [session_id] and told == []


def test_ending_an_already_ended_session_from_the_cli_waits_for_its_owner(
    flow: SessionFlow, now: list[datetime]
) -> None:
    """``celery sessions complete`` reported ``already_ended`` at once."""
    session_id = ended_elsewhere(flow, now)
    call = Call(ops.end_sessions, flow, [session_id], CLOSED, "completed")
    assert not call.done.wait(0.5)
    flow.store.settle(session_id)  # the owner applied the end
    assert call.done.wait(5)
    assert [r["outcome"] for r in call.value] == ["already_ended"]

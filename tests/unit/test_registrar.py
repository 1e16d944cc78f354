"""registrar.py: a registration the session's end overtook, on a real store and backend.

The worker ends a session and settles it while a task it started is still running
(warm shutdown, ``complete()`` from another process); the client's registration of
that task arrives afterwards. The task must keep the result it is about to store:
only tasks the settlement never knew get a failure from the client.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery, states

from sessionflow import SessionFlow
from sessionflow.enums import SessionStatus

SECRET = "registrar-unit-test-secret-0123456789abcdef"
NODE, QUEUE = "w1@host", "sf.worker.w1"


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[SessionFlow]:
    app = Celery("registrartest", broker="memory://", set_as_current=False)
    app.conf.sessionflow_database_url = f"sqlite:///{tmp_path / 'registrar.db'}"
    app.conf.sessionflow_secret_key = SECRET
    app.conf.result_backend = "cache+memory://"
    flow = SessionFlow(app)
    yield flow
    flow.close()
    app.close()


def opened(flow: SessionFlow) -> str:
    """A session open on a worker that stays alive (no sweeper settles it for us)."""
    flow.store.register_worker(
        NODE, host="host", pid=1, queue=QUEUE, max_sessions=3, is_alive=lambda *_: True
    )
    ask = flow.request_session(creation_timeout=5, execution_timeout=60)
    flow.registrar.flush()
    assert flow.store.admit(ask.id, NODE, QUEUE) is not None
    return ask.id


def ids(*names: str) -> list[str]:
    """Task ids of this test only: the memory cache backend lives as long as the process."""
    return [f"{name}-{uuid.uuid4()}" for name in names]


def state(flow: SessionFlow, task_id: str) -> str:
    return str(flow.app.backend.get_state(task_id))


def test_a_task_running_when_the_worker_settled_keeps_its_result(flow: SessionFlow) -> None:
    session_id = opened(flow)
    running, queued = ids("running", "queued")
    flow.registrar.add(session_id, ((running, "app.slow"), (queued, "app.slow")))
    # The worker ends the session before the registrar's next flush: "running" has
    # started there (its claim), "queued" has not reached it.
    assert flow.store.end_session(session_id, SessionStatus.FAILED, "worker_shutdown")
    assert flow.store.settle(session_id, running={running}) is not None
    flow.registrar.flush()
    assert state(flow, running) == states.PENDING  # its own result is still to come
    assert state(flow, queued) == states.FAILURE
    assert flow.registrar.pending() == 0


def test_a_registration_before_the_settlement_is_settled_by_it(flow: SessionFlow) -> None:
    session_id = opened(flow)
    (queued,) = ids("queued")
    flow.registrar.add(session_id, ((queued, "app.slow"),))
    assert flow.store.end_session(session_id, SessionStatus.CLOSED, "completed")
    flow.registrar.flush()  # refused (ended), registered late: not settled yet
    assert state(flow, queued) == states.PENDING
    ended = flow.store.settle(session_id, running=())
    assert ended is not None and ended.cancelled == (queued,)


def test_a_finished_task_keeps_its_result(flow: SessionFlow) -> None:
    session_id = opened(flow)
    (done,) = ids("done")
    flow.registrar.add(session_id, ((done, "app.quick"),))
    flow.app.backend.store_result(done, 42, states.SUCCESS)
    assert flow.store.end_session(session_id, SessionStatus.CLOSED, "completed")
    assert flow.store.settle(session_id) is not None
    flow.registrar.flush()
    assert flow.app.backend.get_result(done) == 42

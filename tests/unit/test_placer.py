"""placer.py: a placing client asks a worker again once that worker's late answer
comes in (or after ``REASK_AFTER``), instead of skipping it for the whole
``creation_timeout``. The worker here is a script on the client's own store and
result backend: which requests it answers, when, and how."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from sessionflow import SessionCreationTimeout, SessionFlow
from sessionflow import placer as placer_module
from sessionflow.records import NewSession

SECRET = "placer-unit-test-secret-0123456789abcdef"
NODE = "p1@unit"


@pytest.fixture
def make_flow(tmp_path: Path) -> Iterator[Callable[[str | None], SessionFlow]]:
    made: list[tuple[Celery, SessionFlow]] = []

    def make(backend: str | None) -> SessionFlow:
        app = Celery("placertest", broker="memory://", backend=backend, set_as_current=False)
        app.conf.sessionflow_database_url = f"sqlite:///{tmp_path / 'placer.db'}"
        app.conf.sessionflow_secret_key = SECRET
        flow = SessionFlow(app)
        flow.store.register_worker(
            NODE,
            host="host",
            pid=1,
            queue="sessionflow.q.p1",
            max_sessions=3,
            is_alive=lambda *_: True,
            resources={"gpu": 2},
        )
        made.append((app, flow))
        return flow

    yield make
    for app, flow in made:
        flow.close()
        app.close()


class ScriptedWorker:
    """Stands in for ``request_admission`` to one worker: ``answer(n)`` says what the
    n-th request (from 1) gets, and after how many seconds; None: it stays queued."""

    def __init__(self, flow: SessionFlow, answer: Callable[[int], tuple[str, float] | None]):
        self.flow, self.answer, self.requests = flow, answer, 0
        self.timers: list[threading.Timer] = []

    def __call__(self, session_id: str, *args: Any, **kwargs: Any) -> None:
        self.requests += 1
        plan = self.answer(self.requests)
        if plan is not None:
            timer = threading.Timer(plan[1], self._do, (plan[0], kwargs["new"], args[2]))
            timer.start()
            self.timers.append(timer)

    def _do(self, what: str, new: NewSession, reply: str | None) -> None:
        answer: dict[str, Any] = {"busy": "gpu 2 of 2 in use", "hostname": NODE}
        if what == "admit":
            record = self.flow.store.open_new(new, NODE, "sessionflow.q.p1")
            assert record is not None
            answer = {"session_id": new.id, "hostname": NODE}
        if reply is not None and self.flow.app.conf.result_backend:
            self.flow.app.backend.store_result(reply, answer, "SUCCESS")

    def join(self) -> None:
        for timer in self.timers:
            timer.join(5)


def assert_admitted_on_second_request(
    flow: SessionFlow, worker: ScriptedWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Create a session asking for the worker's 2 GPUs: it opens there, on the second ask."""
    monkeypatch.setattr(flow, "request_admission", worker)
    try:
        session = flow.create_session(creation_timeout=3, execution_timeout=60, requires={"gpu": 2})
    finally:
        worker.join()
    assert worker.requests == 2
    record = flow.store.get_session(session.id)
    assert record is not None and record.hostname == NODE


def test_a_late_busy_answer_lets_the_client_ask_that_worker_again(
    make_flow: Callable[[str | None], SessionFlow], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker was paused at its cap: it judged the first request after the client
    had moved on (busy), then had room. Before, the client never asked it again and
    timed out although the only worker that fits was free."""
    monkeypatch.setattr(placer_module, "ATTEMPT_TIMEOUT", 0.2)
    flow = make_flow("cache+memory://")
    worker = ScriptedWorker(flow, lambda n: ("busy", 0.4) if n == 1 else ("admit", 0.0))
    assert_admitted_on_second_request(flow, worker, monkeypatch)


def test_a_worker_silent_for_reask_after_is_asked_again_without_a_result_backend(
    make_flow: Callable[[str | None], SessionFlow], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No result backend: no answer ever comes; the client asks again after
    ``REASK_AFTER`` and sees the admission in the store."""
    monkeypatch.setattr(placer_module, "ATTEMPT_TIMEOUT", 0.2)
    monkeypatch.setattr(placer_module, "REASK_AFTER", 0.5)
    flow = make_flow(None)
    worker = ScriptedWorker(flow, lambda n: None if n == 1 else ("admit", 0.0))
    assert_admitted_on_second_request(flow, worker, monkeypatch)


def test_a_worker_that_never_answers_is_asked_once_per_reask_after_then_times_out(
    make_flow: Callable[[str | None], SessionFlow], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(placer_module, "ATTEMPT_TIMEOUT", 0.1)
    monkeypatch.setattr(placer_module, "REASK_AFTER", 0.5)
    flow = make_flow("cache+memory://")
    worker = ScriptedWorker(flow, lambda n: None)
    monkeypatch.setattr(flow, "request_admission", worker)
    with pytest.raises(SessionCreationTimeout, match=f"{NODE} did not answer"):
        flow.create_session(creation_timeout=1.8, execution_timeout=60, requires={"gpu": 2})
    # asked at 0, then once every 0.5 s + the attempt: never a flood of duplicates
    assert 2 <= worker.requests <= 4

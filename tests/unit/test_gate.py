"""The worker main process's gate, without a worker: arrival checks, and how it follows a
session task through the pool's callbacks (a fake pool calls them as billiard does)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery.exceptions import Retry

from sessionflow import tokens
from sessionflow.canvas import SESSION_HEADER
from sessionflow.celery_ext.gate import REFUSED_STATE, Gate
from sessionflow.celery_ext.live import LiveSessions, claim
from sessionflow.celery_ext.tracing import REFUSED
from sessionflow.celery_ext.writer import Writer
from sessionflow.enums import RUN_STARTED
from sessionflow.errors import SessionTaskRefused
from sessionflow.records import NewSession, Run, SessionRecord, utcnow
from sessionflow.store.memory import MemoryStore

KEY = b"k" * 32
NODE = "w1@test"


class Runs:
    """A store that keeps what the writer writes."""

    def __init__(self) -> None:
        self.rows: list[Run] = []

    def record_runs(self, rows: list[Run]) -> None:
        self.rows.extend(rows)


def record(session_id: str) -> SessionRecord:
    """The session as the store opened it on this worker."""
    store = MemoryStore()
    store.create_pending(NewSession(session_id, utcnow(), 30.0, 60.0))
    opened = store.admit(session_id, NODE, "q.w1")
    assert opened is not None
    return opened


@pytest.fixture
def runs() -> Runs:
    return Runs()


@pytest.fixture
def gate(runs: Runs) -> Iterator[Gate]:
    writer = Writer(runs)  # type: ignore[arg-type]
    live = LiveSessions(NODE, "q.w1", 10, runs, None, writer.flush)  # type: ignore[arg-type]
    live.open(record("s-1"))
    gate = Gate(SimpleNamespace(signing_key=KEY), live, writer)  # type: ignore[arg-type]
    try:
        yield gate
    finally:
        live.remove_dir()


class Pool:
    """Records what the gate hands to the pool, and Celery's own callbacks' calls."""

    def __init__(self, gate: Gate) -> None:
        self.options: dict[str, Any] = {}
        self.celery: list[tuple[str, tuple[Any, ...]]] = []
        self.apply = gate.wrap_apply_async(self._apply)

    def _apply(self, target: Any, args: Any = None, kwargs: Any = None, **options: Any) -> str:
        self.options = options
        return "applied"

    def send(self, task_id: str, session_id: str | None = "s-1", retries: int = 0) -> str:
        request: dict[str, Any] = {"id": task_id, "task": "proj.work", "retries": retries}
        if session_id is not None:
            request[SESSION_HEADER] = session_id
        celery = {
            name: self._celery(name) for name in ("accept_callback", "callback", "error_callback")
        }
        result: str = self.apply(None, ("trace", task_id, request, "body"), None, **celery)
        return result

    def _celery(self, name: str) -> Any:
        def callback(*args: Any) -> str:
            self.celery.append((name, args))
            return name

        return callback

    def call(self, name: str, *args: Any) -> Any:
        return self.options[name](*args)


def flushed(gate: Gate, runs: Runs) -> list[Run]:
    gate.writer.flush()
    return runs.rows


def test_a_session_task_is_followed_from_its_start_to_its_end(gate: Gate, runs: Runs) -> None:
    pool, seen = Pool(gate), []
    gate.observers.append(lambda session_id, state: seen.append((session_id, state)))
    assert gate.live.arrived("s-1", "t-1")
    assert pool.send("t-1", retries=2) == "applied"
    before = utcnow()
    assert pool.call("accept_callback", 1234, 0.5) == "accept_callback"
    live = gate.live.get("s-1")
    assert live is not None and live.running == {"t-1"} and not live.queued
    gate.writer.flush()  # a start is written once the task has run for START_DELAY
    assert [r.state for r in runs.rows] == [RUN_STARTED]
    assert pool.call("callback", (False, "the value", 0.01)) == "callback"
    assert not live.running
    [start, end] = flushed(gate, runs)
    assert (end.task_id, end.attempt, end.session_id, end.name) == ("t-1", 2, "s-1", "proj.work")
    assert (end.state, end.worker, end.error) == ("SUCCESS", NODE, None)
    assert end.started_at == start.started_at and before <= end.started_at
    assert end.finished_at is not None and end.finished_at >= end.started_at
    # Celery's own callbacks ran after ours, with the arguments the pool gave.
    assert pool.celery == [
        ("accept_callback", (1234, 0.5)),
        ("callback", ((False, "the value", 0.01),)),
    ]
    assert seen == [("s-1", "SUCCESS")]


@pytest.mark.parametrize(
    ("exc", "state", "error"),
    [
        (Retry(exc=ValueError("again")), "RETRY", "ValueError: again"),
        (KeyError("k"), "FAILURE", "KeyError: 'k'"),
    ],
)
def test_a_failed_result_is_recorded_with_its_error(
    gate: Gate, runs: Runs, exc: Exception, state: str, error: str
) -> None:
    pool = Pool(gate)
    pool.send("t-1")
    pool.call("accept_callback", 1, 0.0)
    pool.call("callback", (True, SimpleNamespace(exception=exc), 0.01))
    [run] = flushed(gate, runs)
    assert (run.state, run.error) == (state, error)


def test_an_error_callback_ends_the_run_as_failed(gate: Gate, runs: Runs) -> None:
    pool = Pool(gate)
    pool.send("t-1")
    pool.call("accept_callback", 1, 0.0)
    try:
        raise MemoryError("worker lost")
    except MemoryError:
        einfo = ExceptionInfo()
    assert pool.call("error_callback", einfo) == "error_callback"
    [run] = flushed(gate, runs)
    assert (run.state, run.error) == ("FAILURE", "MemoryError: worker lost")
    assert pool.celery[-1] == ("error_callback", (einfo,))


def test_a_task_the_pool_refused_leaves_no_run(gate: Gate, runs: Runs) -> None:
    pool, seen = Pool(gate), []
    gate.observers.append(lambda session_id, state: seen.append(state))
    gate.live.arrived("s-1", "t-1")
    pool.send("t-1")
    error = SessionTaskRefused("ended", "s-1")
    setattr(error, REFUSED, True)
    pool.call("callback", (True, SimpleNamespace(exception=error), 0.0))
    live = gate.live.get("s-1")
    assert live is not None and not live.queued and not live.running
    assert flushed(gate, runs) == []
    assert seen == [REFUSED_STATE]


def test_a_failing_hook_of_ours_never_breaks_celerys_callbacks(
    gate: Gate, runs: Runs, caplog: pytest.LogCaptureFixture
) -> None:
    pool = Pool(gate)
    pool.send("t-1")

    def broken(session_id: str, state: str) -> None:
        raise RuntimeError("observer broke")

    gate.live.started = broken  # type: ignore[assignment,method-assign]
    gate.writer.finished = lambda run: broken("", "")  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "sessionflow.worker"):
        assert pool.call("accept_callback", 1, 0.0) == "accept_callback"
        assert pool.call("callback", (False, None, 0.0)) == "callback"
        assert pool.call("error_callback", None) == "error_callback"
    assert [name for name, _ in pool.celery] == ["accept_callback", "callback", "error_callback"]
    assert caplog.text.count("hook failed") == 3


@pytest.mark.parametrize("session_id", [None, "s-elsewhere"])
def test_other_tasks_pass_to_the_pool_untouched(
    gate: Gate, runs: Runs, session_id: str | None
) -> None:
    pool = Pool(gate)
    pool.send("t-1", session_id=session_id)
    pool.options["callback"]((False, None, 0.0))
    assert pool.celery == [("callback", ((False, None, 0.0),))]
    gate.writer.flush()
    assert runs.rows == [] and gate.live.get("s-1") is not None


def test_arrival_needs_the_signature_and_a_session_held_here(gate: Gate) -> None:
    signed = tokens.sign_task(KEY, "s-1", "t-1")
    assert gate.check("s-1", "t-1", signed) is None
    forged = gate.check("s-1", "t-2", signed)  # another task's signature
    assert isinstance(forged, SessionTaskRefused) and "not sent through it" in str(forged)
    assert isinstance(gate.check("s-1", "t-1", None), SessionTaskRefused)
    live = gate.live.get("s-1")
    assert live is not None and live.queued == {"t-1"} and live.tasks == 1


def test_a_claim_is_taken_once_per_task_and_refused_for_a_session_not_held_here(
    gate: Gate,
) -> None:
    assert claim(gate.live.dir, "s-1", "t-1")
    assert claim(gate.live.dir, "s-1", "t-1")  # a redelivery of the same task
    assert sorted(os.listdir(os.path.join(gate.live.dir, "s-1"))) == ["t-1"]
    gate.live.finished("s-1", "t-1")  # the main process releases it at the task's end
    assert os.listdir(os.path.join(gate.live.dir, "s-1")) == []
    assert not claim(gate.live.dir, "s-2", "t-1")  # not held here
    assert not claim(gate.live.dir, "../s-1", "t-1")
    assert gate.live.get("s-1") is not None

"""The worker's run writer (group commit), on the in-memory store: what a failed flush
keeps, what it drops, and that one row the store refuses never blocks the others."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import pytest

from sessionflow.celery_ext.writer import Writer
from sessionflow.errors import StoreError
from sessionflow.records import NewSession, Run, utcnow
from sessionflow.store.memory import MemoryStore

NODE = "w1@host"


def opened(store: MemoryStore) -> str:
    session_id = uuid.uuid4().hex
    assert store.open_new(NewSession(session_id, utcnow(), 30, 3600), NODE, "q") is not None
    return session_id


def ended(session_id: str, task_id: str, error: str | None = None) -> Run:
    now = utcnow()
    state = "FAILURE" if error else "SUCCESS"
    return Run(task_id, 0, session_id, "app.task", state, NODE, now, now, error)


class Down(MemoryStore):
    """A store that cannot be reached until ``up`` is set."""

    up = False

    def record_runs(self, runs: Sequence[Run]) -> None:
        if not self.up:
            raise StoreError("session store write failed: connection refused")
        super().record_runs(runs)


def test_a_row_the_store_refuses_is_dropped_and_the_rest_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run of a session the store no longer has (retention pruned it while the task
    ran) used to fail every flush of the worker from then on: no history at all."""
    store = MemoryStore()
    session_id = opened(store)
    writer = Writer(store)
    writer.finished(ended(session_id, "t1"))
    writer.finished(ended("pruned-session", "t2"))
    writer.finished(ended(session_id, "t3", error="ValueError: boom"))
    with caplog.at_level(logging.ERROR, logger="sessionflow.worker"):
        writer.flush()
    assert [(r.task_id, r.state) for r in store.history(session_id, None, 10)] == [
        ("t1", "SUCCESS"),
        ("t3", "FAILURE"),
    ]
    assert writer.dropped == 1
    assert "dropped 1 task run(s) the store refused" in caplog.text
    assert "pruned-session" in caplog.text
    writer.finished(ended(session_id, "t4"))
    writer.flush()  # nothing is left behind to fail again
    assert len(store.history(session_id, None, 10)) == 3


def test_an_unreachable_store_keeps_every_row_for_later() -> None:
    store = Down()
    session_id = opened(store)
    writer = Writer(store)
    for task_id in ("t1", "t2", "t3"):
        writer.finished(ended(session_id, task_id))
    for _ in range(2):
        with pytest.raises(StoreError):
            writer.flush()
    assert writer.dropped == 0
    store.up = True
    writer.flush()
    assert [r.task_id for r in store.history(session_id, None, 10)] == ["t1", "t2", "t3"]


def test_a_refused_row_alone_is_dropped_at_once() -> None:
    store = MemoryStore()
    session_id = opened(store)
    writer = Writer(store)
    writer.finished(ended("pruned-session", "t1"))
    writer.flush()
    assert writer.dropped == 1
    writer.finished(ended(session_id, "t2"))
    writer.flush()
    assert [r.task_id for r in store.history(session_id, None, 10)] == ["t2"]

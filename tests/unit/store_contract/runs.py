"""Runs: their records, the status they give a task, losses and history."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sessionflow.enums import Reason, SessionStatus, TaskStatus
from sessionflow.errors import StoreRefused
from sessionflow.records import utcnow
from sessionflow.store.base import SessionStore

from .helpers import NODE, NODE2, QUEUE2, T0, Contract, opened, run, send, statuses_of


class RunsContract(Contract):
    """Runs: their records, the status they give a task, losses and history."""

    # -- runs --------------------------------------------------------------------------

    def test_record_runs_start_then_end(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "t1")
        start = utcnow()
        store.record_runs([run(session_id, "t1", started=start)])
        (started,) = store.tasks(session_id)
        assert (started.status, started.worker, started.started_at, started.finished_at) == (
            TaskStatus.STARTED,
            NODE,
            start,
            None,
        )
        end = start + timedelta(seconds=2)
        store.record_runs([run(session_id, "t1", "SUCCESS", started=start, finished=end)])
        (done,) = store.tasks(session_id)
        assert (done.status, done.started_at, done.finished_at) == (
            TaskStatus.SUCCEEDED,
            start,
            end,
        )

    def test_run_text_any_database_refuses_is_replaced(self, store: SessionStore) -> None:
        """A task's exception message is not an input sessionflow can refuse: a NUL
        (PostgreSQL text refuses it) or a lone surrogate (no database can encode it) is
        stored as U+FFFD, and the rest of the batch with it."""
        session_id = opened(store)
        send(store, session_id, "t1", "t2")
        store.record_runs(
            [
                run(session_id, "t1", "FAILURE", error="ValueError: a\x00b\udc80c"),
                run(session_id, "t2", "SUCCESS"),
            ]
        )
        first, second = store.history(session_id, None, 10)
        assert (first.state, first.error) == ("FAILURE", "ValueError: a\ufffdb\ufffdc")
        assert second.state == "SUCCESS"

    def test_a_finished_run_never_runs_again(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "t1", "t2", "t3")
        start = utcnow()
        end = start + timedelta(seconds=1)
        failed = run(session_id, "t1", "FAILURE", started=start, finished=end, error="boom")
        store.record_runs([failed])
        late_start = run(
            session_id, "t1", started=start + timedelta(seconds=5), worker=None, name=None
        )
        store.record_runs([late_start])
        (history,) = store.history(session_id, None, 10)
        assert (history.state, history.finished_at, history.error, history.worker) == (
            "FAILURE",
            end,
            "boom",
            NODE,
        )
        assert history.started_at == start and history.name == "app.task"
        # In one batch, the end wins whichever comes first.
        store.record_runs([run(session_id, "t2", "SUCCESS"), run(session_id, "t2")])
        store.record_runs([run(session_id, "t3"), run(session_id, "t3", "SUCCESS")])
        assert statuses_of(store, session_id) == {
            "t1": TaskStatus.FAILED,
            "t2": TaskStatus.SUCCEEDED,
            "t3": TaskStatus.SUCCEEDED,
        }

    def test_a_later_record_names_its_worker(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "t1")
        start = utcnow()
        store.record_runs([run(session_id, "t1", started=start, worker=None, name=None)])
        store.record_runs([run(session_id, "t1", "SUCCESS", started=start, worker=NODE2)])
        (record,) = store.history(session_id, None, 10)
        assert (record.worker, record.name) == (NODE2, "app.task")

    def test_retries_are_runs_of_their_own(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "t1")
        start = utcnow()
        store.record_runs([run(session_id, "t1", "RETRY", started=start, error="again")])
        assert statuses_of(store, session_id)["t1"] is TaskStatus.PENDING
        second = start + timedelta(seconds=3)
        store.record_runs([run(session_id, "t1", attempt=1, started=second, worker=NODE2)])
        (task,) = store.tasks(session_id)
        assert (task.status, task.worker, task.started_at) == (TaskStatus.STARTED, NODE2, second)
        store.record_runs([run(session_id, "t1", "SUCCESS", attempt=1, started=second)])
        # a late record of the first attempt does not make it the latest
        store.record_runs([run(session_id, "t1", "RETRY", started=start)])
        assert statuses_of(store, session_id)["t1"] is TaskStatus.SUCCEEDED
        assert [r.state for r in store.history(session_id, None, 10)] == ["RETRY", "SUCCESS"]

    @pytest.mark.parametrize(
        ("state", "status"),
        [
            ("SUCCESS", TaskStatus.SUCCEEDED),
            ("IGNORED", TaskStatus.SUCCEEDED),
            ("FAILURE", TaskStatus.FAILED),
            ("REJECTED", TaskStatus.FAILED),
            ("REVOKED", TaskStatus.FAILED),
            ("LOST", TaskStatus.LOST),
            ("RETRY", TaskStatus.PENDING),
        ],
    )
    def test_task_status_from_its_run(
        self, store: SessionStore, state: str, status: TaskStatus
    ) -> None:
        session_id = opened(store)
        send(store, session_id, "t1")
        store.record_runs([run(session_id, "t1", state)])
        assert statuses_of(store, session_id) == {"t1": status}

    def test_runs_of_tasks_not_registered_yet_are_listed(self, store: SessionStore) -> None:
        """A single task's registration comes in a batch after it was sent: its run may
        reach the store first. tasks() lists it from the run; registration adds nothing."""
        session_id = opened(store)
        store.record_runs([run(session_id, "early", "SUCCESS"), run(session_id, "now")])
        assert statuses_of(store, session_id) == {
            "early": TaskStatus.SUCCEEDED,
            "now": TaskStatus.STARTED,
        }
        assert [r.task_id for r in store.history(session_id, None, 10)] == ["early"]
        send(store, session_id, "early")
        assert statuses_of(store, session_id)["early"] is TaskStatus.SUCCEEDED
        assert len(store.tasks(session_id)) == 2

    def test_record_runs_of_an_unknown_session_writes_nothing(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "t1")
        # StoreRefused, not just StoreError: the worker's writer drops a refused row
        # instead of keeping it (and every later row) for an outage to end.
        with pytest.raises(StoreRefused):
            store.record_runs([run(session_id, "t1"), run("no-such-session", "t2")])
        assert statuses_of(store, session_id) == {"t1": TaskStatus.PENDING}
        store.record_runs([])

    def test_lose_interrupted(self, store: SessionStore) -> None:
        a, b = opened(store), opened(store)
        other = opened(store, node=NODE2, queue=QUEUE2)
        send(store, a, "a1", "a2", "a3")
        send(store, b, "b1")
        send(store, other, "o1")
        store.record_runs(
            [
                run(a, "a1"),
                run(a, "a2", "SUCCESS"),
                run(a, "a3", "FAILURE"),
                run(a, "a3", attempt=1),  # finished before: not lost again
                run(b, "b1"),
                run(other, "o1", worker=NODE2),
                run(a, "unregistered"),
            ]
        )
        ended = store.lose_interrupted(NODE)
        by_session = {e.session_id: e for e in ended}
        assert sorted(by_session) == sorted([a, b])
        for session_id, lost in ((a, ("a1",)), (b, ("b1",))):
            found = by_session[session_id]
            assert (found.status, found.reason, found.cancelled, found.lost) == (
                SessionStatus.OPEN,
                "worker_restarted",
                (),
                lost,
            )
        assert statuses_of(store, a)["a1"] is TaskStatus.LOST
        assert statuses_of(store, other) == {"o1": TaskStatus.STARTED}
        states = {(r.task_id, r.state) for r in store.history(a, None, 100)}
        assert {("a1", "LOST"), ("unregistered", "LOST"), ("a2", "SUCCESS")} <= states
        assert store.lose_interrupted(NODE) == []

    def test_lose_interrupted_of_a_silent_worker(self, store: SessionStore) -> None:
        """From a sweeper: only runs of sessions whose heartbeat_timeout has passed."""
        short = opened(store, heartbeat_timeout=3.0)
        long_ = opened(store, heartbeat_timeout=60.0)
        send(store, short, "s1")
        send(store, long_, "l1")
        store.record_runs([run(short, "s1"), run(long_, "l1")])
        for session_id, running in ((short, "s1"), (long_, "l1")):
            assert store.end_session(session_id, SessionStatus.FAILED, "worker_shutdown")
            assert store.settle(session_id, running=[running]) is not None
        assert store.lose_interrupted(NODE, silent_for=2.0, reason="worker_shutdown") == []
        ended = store.lose_interrupted(NODE, silent_for=10.0, reason="worker_shutdown")
        assert [(e.session_id, e.reason, e.lost) for e in ended] == [
            (short, "worker_shutdown", ("s1",))
        ]
        assert statuses_of(store, short) == {"s1": TaskStatus.LOST}
        assert statuses_of(store, long_) == {"l1": TaskStatus.STARTED}
        assert [e.lost for e in store.lose_interrupted(NODE, silent_for=61.0)] == [("l1",)]

    def test_lose_missing(self, store: SessionStore) -> None:
        session_id = opened(store)
        old, new = utcnow() - timedelta(seconds=30), utcnow() + timedelta(seconds=30)
        send(store, session_id, "present", "missing", "running", "done", at=old)
        send(store, session_id, "recent", at=new)
        store.record_runs([run(session_id, "running"), run(session_id, "done", "SUCCESS")])
        before = utcnow()
        ended = store.lose_missing(session_id, {"present", "elsewhere"}, before)
        assert ended is not None
        assert (ended.session_id, ended.status, ended.reason, ended.cancelled, ended.lost) == (
            session_id,
            SessionStatus.OPEN,
            Reason.WORKER_LOST.value,
            (),
            ("missing",),
        )
        assert statuses_of(store, session_id) == {
            "present": TaskStatus.PENDING,
            "missing": TaskStatus.LOST,
            "running": TaskStatus.STARTED,
            "done": TaskStatus.SUCCEEDED,
            "recent": TaskStatus.PENDING,
        }
        assert store.lose_missing(session_id, {"present"}, before) is None
        everything = store.lose_missing(session_id, (), new)
        assert everything is not None and sorted(everything.lost) == ["present", "recent"]

    # -- history -----------------------------------------------------------------------

    def _runs(self, store: SessionStore, session_id: str, n: int) -> list[str]:
        ids = [f"{session_id[:8]}-{i}" for i in range(n)]
        store.record_runs(
            [
                run(session_id, task_id, "SUCCESS", started=T0 + timedelta(seconds=i))
                for i, task_id in enumerate(ids)
            ]
        )
        return ids

    def test_history_newest_within_the_bound(self, store: SessionStore) -> None:
        session_id = opened(store)
        ids = self._runs(store, session_id, 5)
        store.record_runs([run(session_id, "unfinished", started=T0 + timedelta(minutes=1))])

        def history(limit: int | None, bound: int) -> list[str]:
            return [r.task_id for r in store.history(session_id, limit, bound)]

        assert history(None, 100) == ids
        assert history(2, 100) == ids[-2:]
        assert history(None, 3) == ids[-3:]
        assert history(10, 3) == ids[-3:]
        assert history(0, 3) == []
        assert store.history("no-such-session", None, 10) == []
        (first,) = store.history(session_id, 1, 10)
        assert (first.state, first.worker, first.started_at, first.finished_at) == (
            "SUCCESS",
            NODE,
            T0 + timedelta(seconds=4),
            T0 + timedelta(seconds=5),
        )

    def test_history_ties_keep_record_order(self, store: SessionStore) -> None:
        session_id = opened(store)
        store.record_runs([run(session_id, "first", "SUCCESS", started=T0)])
        store.record_runs([run(session_id, "second", "SUCCESS", started=T0)])
        assert [r.task_id for r in store.history(session_id, None, 10)] == ["first", "second"]
        assert [r.task_id for r in store.history(session_id, 1, 10)] == ["second"]

    def test_compact(self, store: SessionStore) -> None:
        session_id = opened(store)
        ids = self._runs(store, session_id, 5)
        store.record_runs([run(session_id, "unfinished")])
        assert store.compact(session_id, 2) == 3
        assert [r.task_id for r in store.history(session_id, None, 10)] == ids[-2:]
        assert store.compact(session_id, 2) == 0
        assert store.compact(session_id, 0) == 2
        assert store.history(session_id, None, 10) == []
        store.record_runs([run(session_id, "unfinished", "SUCCESS")])  # it was kept
        assert [r.task_id for r in store.history(session_id, None, 10)] == ["unfinished"]

    def test_compact_within_a_bound(self, store: SessionStore) -> None:
        session_id = opened(store)
        ids = self._runs(store, session_id, 6)
        # Runs beyond the bound (that history never showed) go without being counted.
        assert store.compact(session_id, 2, bound=4) == 2
        assert [r.task_id for r in store.history(session_id, None, 10)] == ids[-2:]

    def test_trim_history(self, store: SessionStore) -> None:
        a, b, c = opened(store), opened(store), opened(store)
        ids = self._runs(store, a, 5)
        self._runs(store, b, 3)
        self._runs(store, c, 2)
        assert store.trim_history(2, batch=10) == 4
        assert [r.task_id for r in store.history(a, None, 10)] == ids[-2:]
        assert [len(store.history(s, None, 10)) for s in (a, b, c)] == [2, 2, 2]
        assert store.trim_history(2, batch=10) == 0

    def test_trim_history_in_batches(self, store: SessionStore) -> None:
        a, b = opened(store), opened(store)
        self._runs(store, a, 4)
        self._runs(store, b, 4)
        assert store.trim_history(1, batch=1) == 3
        assert sorted(len(store.history(s, None, 10)) for s in (a, b)) == [1, 4]
        assert store.trim_history(1, batch=1) == 3
        assert store.trim_history(1, batch=1) == 0

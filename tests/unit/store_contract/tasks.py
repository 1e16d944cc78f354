"""Tasks: dispatch, ends and settlement."""

from __future__ import annotations

from datetime import timedelta

from sessionflow.enums import SessionStatus, TaskStatus
from sessionflow.records import Dispatch, GroupSpec, utcnow
from sessionflow.store.base import SessionStore

from .helpers import (
    NODE,
    NODE2,
    QUEUE,
    QUEUE2,
    T0,
    Contract,
    close_to,
    late,
    opened,
    pending,
    run,
    send,
    statuses_of,
)


class TasksContract(Contract):
    """Tasks: dispatch, ends and settlement."""

    # -- dispatch --------------------------------------------------------------------

    def test_dispatch_registers_tasks_and_takes_turns(self, store: SessionStore) -> None:
        session_id = opened(store)
        at = utcnow()
        assert send(store, session_id, "t1", "t2", at=at) == QUEUE
        tasks = store.tasks(session_id)
        assert [(t.task_id, t.name, t.status) for t in tasks] == [
            ("t1", "app.t1", TaskStatus.PENDING),
            ("t2", "app.t2", TaskStatus.PENDING),
        ]
        assert all(t.dispatched_at == at for t in tasks)
        assert all((t.worker, t.started_at, t.finished_at) == (None, None, None) for t in tasks)
        found = store.get_session(session_id)
        assert found is not None and found.turns == 2

    def test_dispatch_refused_unless_open(self, store: SessionStore) -> None:
        waiting = pending(store)
        assert send(store, waiting, "t1") is None
        closed = opened(store)
        assert store.end_session(closed, SessionStatus.CLOSED, "completed")
        assert send(store, closed, "t2", groups=(GroupSpec("g1", 1, True),)) is None
        assert send(store, "no-such-session", "t3") is None
        for session_id in (waiting, closed):
            assert store.tasks(session_id) == []
            found = store.get_session(session_id)
            assert found is not None and found.turns == 0
        assert store.branch_view("g1", 0, 0) is None

    def test_dispatch_within_max_turns(self, store: SessionStore) -> None:
        session_id = opened(store, max_turns=3)
        assert send(store, session_id, "t1", "t2") == QUEUE
        assert send(store, session_id, "t3", "t4") is None  # 4 > 3: nothing recorded
        assert send(store, session_id, "t3") == QUEUE  # exactly 3
        assert send(store, session_id, "t4") is None
        assert list(statuses_of(store, session_id)) == ["t1", "t2", "t3"]
        found = store.get_session(session_id)
        assert found is not None and found.turns == 3

    def test_dispatch_of_a_known_task_counts_a_turn_only(self, store: SessionStore) -> None:
        session_id = opened(store)
        assert store.dispatch(Dispatch(session_id, (("t1", "first"),))) == QUEUE
        assert store.dispatch(Dispatch(session_id, (("t1", "second"),))) == QUEUE
        assert [(t.task_id, t.name) for t in store.tasks(session_id)] == [("t1", "first")]
        found = store.get_session(session_id)
        assert found is not None and found.turns == 2
        other = opened(store)
        assert send(store, other, "t1") == QUEUE  # registered to the first session
        assert store.tasks(other) == []

    def test_tasks_in_dispatch_order(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "b", "a", at=T0)
        send(store, session_id, "0", at=T0 + timedelta(seconds=1))
        send(store, session_id, "c", at=T0 - timedelta(seconds=1))
        assert list(statuses_of(store, session_id)) == ["c", "a", "b", "0"]
        assert store.tasks("no-such-session") == []

    def test_late_dispatch_registers_until_settled(self, store: SessionStore) -> None:
        session_id = opened(store)
        assert late(store, session_id, "t1") == ()
        assert store.end_session(session_id, SessionStatus.CLOSED, "completed")
        assert late(store, session_id, "t2", "t3") == ()  # ended, not settled yet
        found = store.get_session(session_id)
        assert found is not None and found.turns == 3
        ended = store.settle(session_id, running=["t3"])
        assert ended is not None and sorted(ended.cancelled) == ["t1", "t2"]
        assert statuses_of(store, session_id) == {
            "t1": TaskStatus.CANCELLED,
            "t2": TaskStatus.CANCELLED,
            "t3": TaskStatus.PENDING,  # it runs on; its own result follows
        }

    def test_late_dispatch_after_settlement_names_the_unknown(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "registered")
        store.record_runs([run(session_id, "ran", "SUCCESS")])
        assert store.end_session(session_id, SessionStatus.FAILED, "worker_shutdown")
        ended = store.settle(session_id, running=["started"])
        assert ended is not None and ended.cancelled == ("registered",)
        # "started" ran when the session was settled: registered then, with a result coming.
        assert late(store, session_id, "registered", "started", "ran", "never") == (
            "ran",
            "never",
        )
        assert sorted(statuses_of(store, session_id)) == ["ran", "registered", "started"]
        found = store.get_session(session_id)
        assert found is not None and found.turns == 1  # nothing written
        waiting = pending(store)
        assert late(store, waiting, "w1") == ("w1",)
        assert late(store, "no-such-session", "x1", "registered") == ("x1",)
        assert store.tasks(waiting) == []

    def test_settle_registers_the_running_it_did_not_know(self, store: SessionStore) -> None:
        session_id = opened(store)
        store.record_runs([run(session_id, "long", name="app.long")])
        assert store.end_session(session_id, SessionStatus.CLOSED, "completed")
        ended = store.settle(session_id, running=["long", "claimed"])
        assert ended is not None and (ended.cancelled, ended.lost) == ((), ())
        tasks = {t.task_id: t for t in store.tasks(session_id)}
        assert sorted(tasks) == ["claimed", "long"]
        assert tasks["long"].name == "app.long" and tasks["long"].status is TaskStatus.STARTED
        assert tasks["claimed"].status is TaskStatus.PENDING

    def test_undo_dispatch_takes_everything_back(self, store: SessionStore) -> None:
        session_id = opened(store, max_turns=4)
        send(store, session_id, "keep")
        undone = Dispatch(
            session_id, (("t1", "a"), ("t2", None)), (GroupSpec("g1", 2, True),), utcnow()
        )
        assert store.dispatch(undone) == QUEUE
        store.undo_dispatch(undone)
        assert list(statuses_of(store, session_id)) == ["keep"]
        found = store.get_session(session_id)
        assert found is not None and found.turns == 1
        assert store.branch_view("g1", 0, 0) is None
        assert send(store, session_id, "t1", "t2", "t3") == QUEUE  # the turns are back

    # -- ends and settlement -----------------------------------------------------------

    def test_end_session_once(self, store: SessionStore) -> None:
        session_id = opened(store)
        assert store.end_session(session_id, SessionStatus.CLOSED, "completed") is True
        assert store.end_session(session_id, SessionStatus.FAILED, "worker_lost") is False
        found = store.get_session(session_id)
        assert found is not None
        assert (found.status, found.reason) == (SessionStatus.CLOSED, "completed")
        assert found.settled is False and close_to(found.closed_at, store.clock())
        assert store.end_session("no-such-session", SessionStatus.CLOSED, "x") is False

    def test_end_session_from_states_and_hostname(self, store: SessionStore) -> None:
        waiting = pending(store)
        assert not store.end_session(waiting, SessionStatus.FAILED, "x")
        assert store.end_session(
            waiting, SessionStatus.FAILED, "creation_timeout", from_states=(SessionStatus.PENDING,)
        )
        session_id = opened(store)
        assert not store.end_session(session_id, SessionStatus.FAILED, "x", hostname=NODE2)
        assert store.end_session(session_id, SessionStatus.FAILED, "worker_lost", hostname=NODE)
        assert store.statuses([session_id])[session_id] == (SessionStatus.FAILED, "worker_lost")

    def test_unsettled_until_settled(self, store: SessionStore) -> None:
        a, b = opened(store), opened(store, node=NODE2, queue=QUEUE2)
        opened(store)
        assert store.unsettled() == []
        assert store.end_session(a, SessionStatus.CLOSED, "completed")
        assert store.end_session(b, SessionStatus.FAILED, "worker_lost")
        assert sorted(store.unsettled()) == sorted([(a, NODE), (b, NODE2)])
        assert store.unsettled(NODE2) == [(b, NODE2)]
        assert store.settle(b) is not None
        assert store.unsettled() == [(a, NODE)]
        found = store.get_session(b)
        assert found is not None and found.settled

    def test_settle_cancels_what_never_started(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "queued", "running", "known", "done", "retried")
        store.record_runs(
            [
                run(session_id, "running"),
                run(session_id, "done", "SUCCESS"),
                run(session_id, "retried", "RETRY"),
            ]
        )
        assert store.settle(session_id) is None  # still open
        assert store.end_session(session_id, SessionStatus.CLOSED, "completed")
        ended = store.settle(session_id, running=["known"])
        assert ended is not None
        assert (ended.session_id, ended.status, ended.reason) == (
            session_id,
            SessionStatus.CLOSED,
            "completed",
        )
        assert sorted(ended.cancelled) == ["queued", "retried"] and ended.lost == ()
        assert store.settle(session_id) is None  # once
        assert statuses_of(store, session_id) == {
            "queued": TaskStatus.CANCELLED,
            "running": TaskStatus.STARTED,
            "known": TaskStatus.PENDING,
            "done": TaskStatus.SUCCEEDED,
            "retried": TaskStatus.CANCELLED,
        }
        cancelled = {t.task_id: t for t in store.tasks(session_id)}["queued"]
        assert cancelled.finished_at is not None

    def test_settle_loses_what_started(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "queued", "running", "known", "done")
        store.record_runs([run(session_id, "running"), run(session_id, "done", "FAILURE")])
        assert store.end_session(session_id, SessionStatus.FAILED, "worker_lost")
        ended = store.settle(session_id, running={"known"}, lose_started=True)
        assert ended is not None
        assert (ended.status, ended.reason) == (SessionStatus.FAILED, "worker_lost")
        assert ended.cancelled == ("queued",)
        assert sorted(ended.lost) == ["known", "running"]
        assert statuses_of(store, session_id) == {
            "queued": TaskStatus.CANCELLED,
            "running": TaskStatus.LOST,
            "known": TaskStatus.LOST,
            "done": TaskStatus.FAILED,
        }
        lost_run = [r for r in store.history(session_id, None, 100) if r.task_id == "running"]
        assert [(r.state, r.error) for r in lost_run] == [("LOST", "the worker process died")]

    def test_settle_of_unknown_or_open_session(self, store: SessionStore) -> None:
        assert store.settle("no-such-session") is None
        assert store.settle(opened(store), lose_started=True) is None
        assert store.settle(pending(store)) is None

    def test_an_abandoned_session_is_settled(self, store: SessionStore) -> None:
        session_id = pending(store)
        assert store.abandon_pending(session_id, "creation_timeout")
        assert store.settle(session_id) is None

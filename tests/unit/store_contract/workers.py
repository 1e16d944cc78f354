"""Workers, heartbeats and leases."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sessionflow.enums import SessionStatus, WorkerStatus
from sessionflow.errors import NodeNameInUse
from sessionflow.records import utcnow
from sessionflow.store.base import SessionStore

from .helpers import (
    NODE,
    NODE2,
    QUEUE,
    QUEUE2,
    Contract,
    close_to,
    never_asked,
    opened,
    register,
    run,
)


class WorkersContract(Contract):
    """Workers, heartbeats and leases."""

    # -- workers -----------------------------------------------------------------------

    def test_register_worker(self, store: SessionStore) -> None:
        register(store, NODE, pid=11, max_sessions=7)
        (worker,) = store.workers()
        assert (worker.nodename, worker.host, worker.pid, worker.queue) == (
            NODE,
            "host-a",
            11,
            QUEUE,
        )
        assert (worker.max_sessions, worker.status, worker.open_sessions) == (
            7,
            WorkerStatus.ONLINE,
            0,
        )
        assert close_to(worker.started_at, store.clock())
        assert worker.last_heartbeat_at == worker.started_at
        assert 0 <= worker.heartbeat_age < 5

    def test_register_worker_again_from_the_same_process(self, store: SessionStore) -> None:
        register(store, NODE, pid=11)
        store.heartbeat(NODE, at=utcnow() - timedelta(seconds=50))
        register(store, NODE, pid=11, is_alive=never_asked)
        (worker,) = store.workers()
        assert worker.heartbeat_age < 5

    def test_a_live_worker_keeps_its_name(self, store: SessionStore) -> None:
        register(store, NODE, pid=11)
        store.heartbeat(NODE, at=utcnow() - timedelta(seconds=30))
        asked: list[tuple[str | None, int, float]] = []

        def alive(host: str | None, pid: int, age: float) -> bool:
            asked.append((host, pid, age))
            return True

        with pytest.raises(NodeNameInUse, match="-n"):
            register(store, NODE, pid=12, is_alive=alive)
        ((host, pid, age),) = asked
        assert (host, pid) == ("host-a", 11) and 25 < age < 40
        (worker,) = store.workers()
        assert worker.pid == 11 and worker.heartbeat_age > 25  # nothing changed

    def test_a_dead_or_offline_worker_gives_up_its_name(self, store: SessionStore) -> None:
        register(store, NODE, pid=11)
        register(store, NODE, pid=12, host="host-b", is_alive=lambda *_: False)
        store.worker_offline(NODE)
        register(store, NODE, pid=13, is_alive=never_asked)
        (worker,) = store.workers()
        assert (worker.pid, worker.host, worker.status) == (13, "host-a", WorkerStatus.ONLINE)

    def test_heartbeat(self, store: SessionStore) -> None:
        register(store, NODE, max_sessions=3)
        beat = utcnow() - timedelta(seconds=20)
        store.heartbeat(NODE, at=beat, max_sessions=9)
        (worker,) = store.workers()
        assert (worker.last_heartbeat_at, worker.max_sessions) == (beat, 9)
        assert 15 < worker.heartbeat_age < 30
        store.worker_offline(NODE)
        assert store.workers()[0].status is WorkerStatus.OFFLINE
        store.heartbeat(NODE)
        (worker,) = store.workers()
        assert worker.status is WorkerStatus.ONLINE and worker.max_sessions == 9
        assert worker.heartbeat_age < 5
        store.heartbeat("nobody@host")
        assert [w.nodename for w in store.workers()] == [NODE]

    def test_a_heartbeat_that_keeps_the_worker_offline(self, store: SessionStore) -> None:
        register(store, NODE)
        store.heartbeat(NODE, at=utcnow() - timedelta(seconds=20))
        store.worker_offline(NODE)
        store.heartbeat(NODE, online=False)  # finishing its tasks after a warm shutdown
        (worker,) = store.workers()
        assert worker.status is WorkerStatus.OFFLINE and worker.heartbeat_age < 5

    def test_clock_is_aware_and_current(self, store: SessionStore) -> None:
        now = store.clock()
        assert now.tzinfo is not None and close_to(now, utcnow())

    def test_workers_count_open_sessions(self, store: SessionStore) -> None:
        register(store, NODE2)
        register(store, NODE)
        opened(store), opened(store), opened(store, node=NODE2, queue=QUEUE2)
        closed = opened(store)
        assert store.end_session(closed, SessionStatus.CLOSED, "completed")
        assert [(w.nodename, w.open_sessions) for w in store.workers()] == [(NODE, 2), (NODE2, 1)]

    def test_silent_workers(self, store: SessionStore) -> None:
        old = utcnow() - timedelta(seconds=60)
        for node in (NODE, NODE2, "idle@host", "ended@host", "fresh@host"):
            register(store, node)
            if node != "fresh@host":
                store.heartbeat(node, at=old)
        opened(store), opened(store, node="fresh@host")
        ended = opened(store, node="ended@host")
        assert store.end_session(ended, SessionStatus.FAILED, "worker_lost")
        moved = opened(store, node=NODE2, affinity="soft")
        store.worker_offline(NODE)
        silent = {name: (age, status) for name, age, status in store.silent_workers(30)}
        assert sorted(silent) == sorted(["ended@host", NODE2, NODE])
        assert silent[NODE][1] is WorkerStatus.OFFLINE
        assert silent[NODE2][1] is WorkerStatus.ONLINE
        assert all(55 < age < 75 for age, _ in silent.values())
        assert store.silent_workers(120) == []
        assert store.settle(ended) is not None  # settled: nothing left to judge there
        assert store.begin_move(moved, NODE2) is not None  # moved away
        assert [name for name, _, _ in store.silent_workers(30)] == [NODE]

    def test_a_worker_with_unfinished_runs_is_judged(self, store: SessionStore) -> None:
        """Its sessions ended and were settled (a warm shutdown) but a task still ran."""
        register(store, NODE)
        store.heartbeat(NODE, at=utcnow() - timedelta(seconds=60))
        session_id = opened(store)
        store.record_runs([run(session_id, "long")])
        assert store.end_session(session_id, SessionStatus.FAILED, "worker_shutdown")
        assert store.settle(session_id, running=["long"]) is not None
        assert [name for name, _, _ in store.silent_workers(30)] == [NODE]
        store.record_runs([run(session_id, "long", "SUCCESS")])
        assert store.silent_workers(30) == []

    # -- leases ------------------------------------------------------------------------

    def test_lease_has_one_holder(self, store: SessionStore) -> None:
        assert store.holds_lease("sweeper", "a") is False
        assert store.take_lease("sweeper", "a", 30) is True
        assert store.holds_lease("sweeper", "a") is True
        assert store.take_lease("sweeper", "b", 30) is False
        assert store.holds_lease("sweeper", "b") is False
        assert store.take_lease("sweeper", "a", 30) is True  # renewed
        assert store.take_lease("other", "b", 30) is True  # another lease

    def test_an_expired_lease_is_free(self, store: SessionStore) -> None:
        assert store.take_lease("sweeper", "a", -1) is True  # expired at once
        assert store.holds_lease("sweeper", "a") is False
        assert store.take_lease("sweeper", "b", 30) is True
        assert store.holds_lease("sweeper", "b") is True
        assert store.holds_lease("sweeper", "a") is False
        assert store.take_lease("sweeper", "a", 30) is False

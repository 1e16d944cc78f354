"""Races: the store's conditional transitions decide, whatever the timing."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

from sessionflow.enums import SessionStatus, TaskStatus
from sessionflow.errors import StateConflict
from sessionflow.records import GroupSpec
from sessionflow.store.base import SessionStore

from .helpers import (
    BIG,
    NODE,
    NODE2,
    QUEUE,
    QUEUE2,
    Contract,
    late,
    opened,
    pending,
    put,
    race,
    rules,
    run,
    send,
    statuses_of,
    write,
)


class RacesContract(Contract):
    """Races: the store's conditional transitions decide, whatever the timing."""

    # -- races: conditional transitions decide ---------------------------------------------

    def test_abandon_pending_vs_admit(self, store: SessionStore) -> None:
        for _ in range(10):
            session_id = pending(store)
            admitted, abandoned = race(
                partial(store.admit, session_id, NODE, QUEUE),
                partial(store.abandon_pending, session_id, "creation_timeout"),
            )
            assert (admitted is not None) != abandoned, (admitted, abandoned)
            status = store.statuses([session_id])[session_id][0]
            assert status is (SessionStatus.FAILED if abandoned else SessionStatus.OPEN)

    def test_late_dispatch_vs_settle(self, store: SessionStore) -> None:
        """Each late task is registered before the settlement (and settled by it) or
        named unknown after it: never registered after it, never both."""
        for i in range(10):
            queued, running = f"queued{i}", f"running{i}"  # task ids are unique store-wide
            session_id = opened(store)
            assert store.end_session(session_id, SessionStatus.FAILED, "worker_shutdown")
            unknown, ended = race(
                partial(late, store, session_id, queued, running),
                partial(store.settle, session_id, running=[running]),
            )
            assert ended is not None
            statuses = statuses_of(store, session_id)
            if unknown == ():
                assert ended.cancelled == (queued,)
                assert statuses[queued] is TaskStatus.CANCELLED
            else:
                assert unknown == (queued,) and ended.cancelled == ()
                assert queued not in statuses
            assert statuses[running] is TaskStatus.PENDING

    def test_two_workers_admit_one_session(self, store: SessionStore) -> None:
        for _ in range(5):
            session_id = pending(store)
            results = race(
                partial(store.admit, session_id, NODE, QUEUE),
                partial(store.admit, session_id, NODE2, QUEUE2),
            )
            winners = [r for r in results if r is not None]
            assert len(winners) == 1
            found = store.get_session(session_id)
            assert found is not None and found.hostname == winners[0].hostname

    def test_end_session_from_threads_one_wins(self, store: SessionStore) -> None:
        session_id = opened(store)
        ends = [(SessionStatus.CLOSED, "a"), (SessionStatus.FAILED, "b")] * 3
        results = race(
            *(
                lambda status=status, reason=reason: store.end_session(session_id, status, reason)
                for status, reason in ends
            )
        )
        assert results.count(True) == 1
        assert store.statuses([session_id])[session_id] == ends[results.index(True)]

    def test_settle_from_threads_settles_once(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, *(f"t{i}" for i in range(5)))
        assert store.end_session(session_id, SessionStatus.CLOSED, "completed")
        results = race(*(lambda: store.settle(session_id, lose_started=True) for _ in range(5)))
        settled = [r for r in results if r is not None]
        assert len(settled) == 1
        assert sorted(settled[0].cancelled) == [f"t{i}" for i in range(5)]

    def test_dispatch_after_the_end_is_refused(self, store: SessionStore) -> None:
        session_id = opened(store)
        ended = threading.Event()
        late: list[str] = []

        def dispatcher(n: int) -> list[str]:
            accepted = []
            for i in range(15):
                task_id = f"d{n}-{i}"
                after = ended.is_set()
                if send(store, session_id, task_id) is not None:
                    accepted.append(task_id)
                    if after:
                        late.append(task_id)
            return accepted

        def end() -> bool:
            result = store.end_session(session_id, SessionStatus.CLOSED, "completed")
            ended.set()
            return result

        *accepted, closed = race(
            lambda: dispatcher(0), lambda: dispatcher(1), lambda: dispatcher(2), end
        )
        assert closed is True and late == []
        registered = sorted(t for batch in accepted for t in batch)
        assert sorted(statuses_of(store, session_id)) == registered
        found = store.get_session(session_id)
        assert found is not None and found.turns == len(registered)
        settled = store.settle(session_id)
        assert settled is not None and sorted(settled.cancelled) == registered
        assert send(store, session_id, "after") is None

    def test_concurrent_dispatches_never_exceed_max_turns(self, store: SessionStore) -> None:
        session_id = opened(store, max_turns=5)
        results = race(*(lambda n=n: send(store, session_id, f"a{n}", f"b{n}") for n in range(6)))
        assert results.count(QUEUE) == 2 and results.count(None) == 4
        found = store.get_session(session_id)
        assert found is not None and found.turns == 4
        assert len(store.tasks(session_id)) == 4
        assert send(store, session_id, "last") == QUEUE
        assert send(store, session_id, "over") is None

    def test_task_start_vs_settle(self, store: SessionStore) -> None:
        """A task the worker starts while its session is settled is cancelled or running,
        never both."""
        for _ in range(5):
            session_id = opened(store)
            task_id = f"{session_id}-t"
            send(store, session_id, task_id)
            assert store.end_session(session_id, SessionStatus.CLOSED, "completed")
            _, ended = race(
                partial(store.record_runs, [run(session_id, task_id)]),
                partial(store.settle, session_id),
            )
            assert ended is not None
            status = statuses_of(store, session_id)[task_id]
            if task_id in ended.cancelled:
                assert status is TaskStatus.CANCELLED
            else:
                assert status is TaskStatus.STARTED

    def test_one_process_takes_a_free_lease(self, store: SessionStore) -> None:
        results = race(*(lambda h=h: store.take_lease("race", f"h{h}", 30) for h in range(6)))
        assert results.count(True) == 1
        winner = f"h{results.index(True)}"
        assert store.holds_lease("race", winner)

    def test_atomic_increments_from_threads_add_up(self, store: SessionStore) -> None:
        session_id = opened(store)

        def add() -> None:
            for _ in range(10):
                store.state_atomic(
                    session_id, "session", session_id, ("increment", "n", 1), BIG, BIG
                )

        race(add, add, add, add)
        assert store.state_read("session", session_id, "n") == (40, 40)

    def test_compare_and_set_from_threads_one_wins(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "k", 0)

        def cas(value: int) -> bool:
            try:
                store.state_write(session_id, [write("session", session_id, "k", value, 1)], BIG)
            except StateConflict:
                return False
            return True

        results = race(*(lambda v=v: cas(v) for v in range(1, 6)))
        assert results.count(True) == 1
        assert store.state_read("session", session_id, "k") == (results.index(True) + 1, 2)

    def test_creates_from_threads_one_wins(self, store: SessionStore) -> None:
        """Compare-and-set with 0 ("must not exist"), also over a key a refused merge
        locked: one creator wins."""
        session_id = opened(store, merge_policy="raise")
        put(store, session_id, "moved", 1)
        send(store, session_id, "m0", groups=(GroupSpec("g", 1, True),))
        put(store, session_id, "moved", 2)
        refused = store.branch_done("g", 0, 0, [("set", "moved", 3), ("set", "k2", 1)], rules)
        assert isinstance(refused, StateConflict)
        for key in ("k1", "k2"):

            def create(value: int, key: str = key) -> bool:
                try:
                    store.state_write(
                        session_id, [write("session", session_id, key, value, 0)], BIG
                    )
                except StateConflict:
                    return False
                return True

            results = race(*(partial(create, v) for v in range(5)))
            assert results.count(True) == 1, key
            assert store.state_read("session", session_id, key) == (results.index(True), 1)

    def test_branches_finishing_together_merge_once(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "n", 100)
        send(store, session_id, *(f"m{i}" for i in range(6)), groups=(GroupSpec("g", 6, True),))
        merges: list[int] = []

        def counting(*args: Any) -> dict[str, Any]:
            merges.append(1)
            return rules(*args)

        results = race(
            *(
                partial(
                    store.branch_done,
                    "g",
                    member,
                    0,
                    [("increment", "n", 1), ("append", "order", member)],
                    counting,
                )
                for member in range(6)
            )
        )
        assert results == [None] * 6 and merges == [1]
        assert store.state_read("session", session_id, "n") == (106, 2)
        assert store.state_read("session", session_id, "order") == ([0, 1, 2, 3, 4, 5], 1)

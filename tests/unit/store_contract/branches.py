"""Branches: snapshots, finished and failed steps, the merge; and retention."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from sessionflow.enums import SessionStatus
from sessionflow.errors import StateConflict, StateValueError, StoreError
from sessionflow.merge import MISSING
from sessionflow.records import GroupSpec, PruneCounts
from sessionflow.store.base import SessionStore

from .helpers import BIG, Contract, opened, put, rules, run, send, write


class BranchesContract(Contract):
    """Branches: snapshots, finished and failed steps, the merge; and retention."""

    # -- branches --------------------------------------------------------------------

    def test_branch_snapshot_at_dispatch(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "k", 1)
        put(store, session_id, "gone", 1)
        put(store, session_id, "gone", MISSING)
        store.state_write(session_id, [write("user", "u1", "u", 1)], BIG)
        send(store, session_id, "m0", "m1", groups=(GroupSpec("g", 2, True),))
        put(store, session_id, "k", 2)
        view = store.branch_view("g", 0, 0)
        assert view is not None and (view.snapshot, view.earlier) == ({"k": 1}, [])
        assert store.branch_view("unknown", 0, 0) is None

    def test_branch_snapshot_at_first_view(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "k", 1)
        send(store, session_id, "m0", "m1", groups=(GroupSpec("g", 2, False),))
        put(store, session_id, "k", 2)
        first = store.branch_view("g", 1, 0)
        assert first is not None and first.snapshot == {"k": 2}
        put(store, session_id, "k", 3)
        again = store.branch_view("g", 0, 0)
        assert again is not None and again.snapshot == {"k": 2}

    def test_branch_view_has_the_members_earlier_steps(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "a0", "a1", "a2", "b0", groups=(GroupSpec("g", 4, True),))
        assert (
            store.branch_done("g", 0, 1, [("increment", "n", 2), ("set", "x", [1])], rules) is None
        )
        assert store.branch_done("g", 0, 0, [("set", "n", 1)], rules) is None
        assert store.branch_done("g", 1, 0, [("set", "other", 1)], rules) is None
        view = store.branch_view("g", 0, 2)
        assert view is not None
        assert view.earlier == [("set", "n", 1), ("increment", "n", 2), ("set", "x", [1])]
        first = store.branch_view("g", 0, 1)
        assert first is not None and first.earlier == [("set", "n", 1)]
        own = store.branch_view("g", 0, 0)
        assert own is not None and own.earlier == []

    def test_branches_merge_in_member_order(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "n", 10)
        put(store, session_id, "drop", True)
        send(store, session_id, "m0", "m1", "m2", groups=(GroupSpec("g", 3, True),))
        assert (
            store.branch_done("g", 2, 0, [("set", "k", "two"), ("increment", "n", 100)], rules)
            is None
        )
        assert (
            store.branch_done("g", 1, 0, [("set", "k", "one"), ("delete", "drop", None)], rules)
            is None
        )
        assert store.state_read("session", session_id, "k") == (MISSING, 0)  # not merged yet
        assert (
            store.branch_done("g", 0, 0, [("set", "k", "zero"), ("increment", "n", 1)], rules)
            is None
        )
        assert store.state_scope("session", session_id) == {"k": ("two", 1), "n": (111, 2)}
        assert store.state_read("session", session_id, "drop") == (MISSING, 2)
        assert store.branch_view("g", 0, 0) is None  # merged
        assert store.branch_done("g", 0, 0, [("set", "k", "late")], rules) is None
        assert store.state_read("session", session_id, "k") == ("two", 1)

    def test_a_step_counts_once(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "m0", "m1", groups=(GroupSpec("g", 2, True),))
        assert store.branch_done("g", 0, 0, [("set", "a", 1)], rules) is None
        assert store.branch_done("g", 0, 0, [("set", "a", 2)], rules) is None  # redelivered
        assert store.branch_view("g", 1, 0) is not None  # still open
        assert store.branch_done("g", 1, 0, [("set", "b", 1)], rules) is None
        assert store.state_scope("session", session_id) == {"a": (1, 1), "b": (1, 1)}

    def test_a_failed_step_discards_the_rest_of_its_member(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "a0", "a1", "a2", "b0", groups=(GroupSpec("g", 4, True),))
        assert store.branch_done("g", 0, 0, [("set", "a", 0)], rules) is None
        assert store.branch_failed("g", 0, 1, 3, rules) is None  # steps 1 and 2 of member 0
        assert store.branch_failed("g", 0, 1, 3, rules) is None  # counted once
        assert store.branch_view("g", 1, 0) is not None
        view = store.branch_view("g", 0, 2)
        assert view is not None and view.earlier == [("set", "a", 0)]  # failed steps add nothing
        assert store.branch_done("g", 1, 0, [("set", "b", 1)], rules) is None
        assert store.state_scope("session", session_id) == {"a": (0, 1), "b": (1, 1)}
        assert store.branch_done("g", 0, 2, [("set", "a", 2)], rules) is None  # discarded

    def test_a_failed_last_step_merges_the_others(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "a0", "b0", groups=(GroupSpec("g", 2, True),))
        assert store.branch_done("g", 1, 0, [("append", "l", "b")], rules) is None
        assert store.branch_failed("g", 0, 0, 1, rules) is None
        assert store.state_scope("session", session_id) == {"l": (["b"], 1)}

    def test_merge_gets_the_sessions_policy_and_reducers(self, store: SessionStore) -> None:
        session_id = opened(store, merge_policy="raise", reducers={"total": "sum"})
        put(store, session_id, "total", 5)
        put(store, session_id, "x", "live")
        send(store, session_id, "m0", "m1", "m2", groups=(GroupSpec("g", 3, True),))
        put(store, session_id, "x", "moved")
        calls: list[tuple[Any, ...]] = []

        def recording(*args: Any) -> dict[str, Any]:
            calls.append(args)
            return rules(*args)

        assert store.branch_done("g", 1, 0, [("set", "total", 2)], recording) is None
        assert store.branch_failed("g", 2, 0, 1, recording) is None
        assert (
            store.branch_done("g", 0, 0, [("set", "total", 1), ("set", "y", 1)], recording) is None
        )
        ((live, snapshot, logs, policy, reducers),) = calls
        assert live == {"total": 5}
        assert snapshot == {"total": 5, "x": "live"}
        assert logs == [[("set", "total", 1), ("set", "y", 1)], [("set", "total", 2)]]
        assert (policy, reducers) == ("raise", {"total": "sum"})
        assert store.state_scope("session", session_id) == {
            "total": (8, 2),
            "x": ("moved", 2),
            "y": (1, 1),
        }

    def test_a_refused_merge_marks_the_group(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "k", 1)
        send(store, session_id, "m0", "m1", groups=(GroupSpec("g", 2, True),))

        def refuse(*args: Any) -> dict[str, Any]:
            raise StateConflict("no", ["k"])

        assert store.branch_done("g", 0, 0, [("set", "k", 2)], refuse) is None
        error = store.branch_done("g", 1, 0, [("set", "k", 3)], refuse)
        assert isinstance(error, StateConflict) and error.keys == ["k"]
        assert store.state_read("session", session_id, "k") == (1, 1)
        assert store.branch_view("g", 0, 0) is None  # not open any more
        assert store.branch_failed("g", 1, 0, 1, refuse) is None

    def test_a_merge_that_is_not_json_is_refused(self, store: SessionStore) -> None:
        session_id = opened(store)
        send(store, session_id, "m0", groups=(GroupSpec("g", 1, True),))

        def bad(*args: Any) -> dict[str, Any]:
            return {"k": {1, 2}}

        error = store.branch_done("g", 0, 0, [("set", "k", 1)], bad)
        assert isinstance(error, StateValueError)
        assert store.state_read("session", session_id, "k") == (MISSING, 0)

    def test_steps_of_an_unknown_group(self, store: SessionStore) -> None:
        with pytest.raises(StoreError):
            store.branch_done("unknown", 0, 0, [("set", "k", 1)], rules)
        with pytest.raises(StoreError):
            store.branch_failed("unknown", 0, 0, 2, rules)

    # -- retention -----------------------------------------------------------------------

    def test_prune(self, store: SessionStore) -> None:
        first, second, unsettled, later = (opened(store) for _ in range(4))
        still_open = opened(store)
        for session_id in (first, second, unsettled, later, still_open):
            send(
                store,
                session_id,
                f"{session_id}-t",
                groups=(GroupSpec(f"{session_id}-g", 2, True),),
            )
            store.record_runs([run(session_id, f"{session_id}-t", "SUCCESS")])
            put(store, session_id, "a", 1)
            put(store, session_id, "b", 1)
            put(store, session_id, "b", MISSING)  # a tombstone is a row too
        store.state_write(first, [write("user", "u1", "kept", 1)], BIG)
        for session_id in (first, second, unsettled):
            assert store.end_session(session_id, SessionStatus.CLOSED, "completed")
        for session_id in (first, second):
            assert store.settle(session_id) is not None
        cutoff = store.clock() + timedelta(microseconds=1)
        assert store.end_session(later, SessionStatus.CLOSED, "completed")
        assert store.settle(later) is not None
        # make sure "later" ended after the cutoff on every clock
        later_record = store.get_session(later)
        assert later_record is not None and later_record.closed_at is not None
        if later_record.closed_at < cutoff:
            pytest.fail("the store's clock went backwards")

        assert store.prune(cutoff, batch=1, dry_run=True) == PruneCounts(2, 2, 2, 4)
        assert store.prune(cutoff, batch=1) == PruneCounts(1, 1, 1, 2)
        assert store.get_session(first) is None
        assert store.tasks(first) == [] and store.history(first, None, 10) == []
        assert store.state_read("session", first, "b") == (MISSING, 0)
        assert store.branch_view(f"{first}-g", 0, 0) is None
        assert store.state_read("user", "u1", "kept") == (1, 1)
        for kept in (second, unsettled, later, still_open):
            assert store.get_session(kept) is not None
            assert store.branch_view(f"{kept}-g", 0, 0) is not None
        assert store.prune(cutoff, batch=10) == PruneCounts(1, 1, 1, 2)
        assert store.get_session(second) is None
        assert store.prune(cutoff, batch=10) == PruneCounts()
        assert store.prune(cutoff, batch=10, dry_run=True) == PruneCounts()
        assert len(store.list_sessions()) == 3

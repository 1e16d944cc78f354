"""State: versions, compare-and-set, size limits, atomic operations, clearing."""

from __future__ import annotations

import pytest

from sessionflow.enums import SessionStatus
from sessionflow.errors import (
    SessionClosed,
    SessionFailed,
    SessionNotFound,
    StateConflict,
    StateValueError,
)
from sessionflow.merge import MISSING
from sessionflow.records import GroupSpec
from sessionflow.store.base import SessionStore

from .helpers import BIG, Contract, opened, pending, put, rules, send, write


class StateContract(Contract):
    """State: versions, compare-and-set, size limits, atomic operations, clearing."""

    # -- state: reads and writes --------------------------------------------------------

    def test_state_versions_and_tombstones(self, store: SessionStore) -> None:
        session_id = opened(store)
        assert store.state_read("session", session_id, "k") == (MISSING, 0)
        assert put(store, session_id, "k", {"a": [1, 2]}) == 1
        assert store.state_read("session", session_id, "k") == ({"a": [1, 2]}, 1)
        assert put(store, session_id, "k", "v2") == 2
        assert put(store, session_id, "k", MISSING) == 3
        assert store.state_read("session", session_id, "k") == (MISSING, 3)
        assert store.state_scope("session", session_id) == {}
        assert put(store, session_id, "k", None) == 4  # None is a value
        assert store.state_read("session", session_id, "k") == (None, 4)

    def test_state_scope_in_key_order(self, store: SessionStore) -> None:
        session_id = opened(store)
        store.state_write(
            session_id,
            [
                write("session", session_id, "b", 2),
                write("session", session_id, "a", [1]),
                write("session", session_id, "c", 3),
                write("user", "u1", "a", "user's"),
            ],
            BIG,
        )
        put(store, session_id, "c", MISSING)
        scope = store.state_scope("session", session_id)
        assert list(scope.items()) == [("a", ([1], 1)), ("b", (2, 1))]
        assert store.state_scope("user", "u1") == {"a": ("user's", 1)}
        assert store.state_scope("app", "") == {}

    def test_state_values_are_copies(self, store: SessionStore) -> None:
        session_id = opened(store)
        value = {"list": [1]}
        put(store, session_id, "k", value)
        value["list"].append(2)
        read, _ = store.state_read("session", session_id, "k")
        assert read == {"list": [1]}
        read["list"].append(3)
        assert store.state_read("session", session_id, "k")[0] == {"list": [1]}
        assert store.state_scope("session", session_id)["k"][0] == {"list": [1]}

    def test_state_write_returns_versions(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "a", 1)
        versions = store.state_write(
            session_id,
            [write("session", session_id, "a", 2), write("session", session_id, "b", 1)],
            BIG,
        )
        assert versions == {"a": 2, "b": 1}

    def test_compare_and_set(self, store: SessionStore) -> None:
        session_id = opened(store)
        assert store.state_write(session_id, [write("session", session_id, "k", 1, 0)], BIG) == {
            "k": 1
        }
        with pytest.raises(StateConflict) as info:
            store.state_write(session_id, [write("session", session_id, "k", 2, 0)], BIG)
        assert info.value.keys == ["k"]
        assert store.state_write(session_id, [write("session", session_id, "k", 2, 1)], BIG) == {
            "k": 2
        }
        with pytest.raises(StateConflict):
            store.state_write(session_id, [write("session", session_id, "k", 3, 1)], BIG)
        assert store.state_read("session", session_id, "k") == (2, 2)

    def test_compare_and_set_of_a_deleted_key(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "k", 1)
        put(store, session_id, "k", MISSING)  # version 2: a tombstone, not "never existed"
        with pytest.raises(StateConflict):
            store.state_write(session_id, [write("session", session_id, "k", 5, 0)], BIG)
        assert store.state_write(session_id, [write("session", session_id, "k", 5, 2)], BIG) == {
            "k": 3
        }
        # delete by compare-and-set
        assert store.state_write(
            session_id, [write("session", session_id, "k", MISSING, 3)], BIG
        ) == {"k": 4}
        assert store.state_read("session", session_id, "k") == (MISSING, 4)

    def test_state_conflict_names_every_key_and_writes_nothing(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "a", 1)
        put(store, session_id, "b", 1)
        put(store, session_id, "b", 2)
        with pytest.raises(StateConflict) as info:
            store.state_write(
                session_id,
                [
                    write("session", session_id, "c", 9, 5),
                    write("session", session_id, "a", 9, 1),  # right
                    write("session", session_id, "b", 9, 1),  # moved to 2
                    write("session", session_id, "new", 9),
                ],
                BIG,
            )
        assert info.value.keys == ["b", "c"]
        assert store.state_read("session", session_id, "a") == (1, 1)
        assert store.state_read("session", session_id, "new") == (MISSING, 0)

    def test_state_size_limit_per_scope(self, store: SessionStore) -> None:
        session_id = opened(store)
        limit = 10
        assert put(store, session_id, "a", "1234", limit) == 1  # 6 bytes
        with pytest.raises(StateValueError, match="state_max_session_bytes") as info:
            put(store, session_id, "b", "1234", limit)  # 6 + 6 > 10
        assert info.value.key == "b"
        assert store.state_read("session", session_id, "b") == (MISSING, 0)
        assert put(store, session_id, "a", "12345678", limit) == 2  # replaces itself: 10
        assert put(store, session_id, "a", MISSING, 1) == 3  # deletes always fit
        assert put(store, session_id, "b", "12345678", limit) == 1
        # another scope has a limit of its own
        store.state_write(session_id, [write("user", "u1", "b", "12345678")], limit)
        assert store.state_read("user", "u1", "b") == ("12345678", 1)

    def test_state_write_is_all_or_nothing(self, store: SessionStore) -> None:
        session_id = opened(store)
        with pytest.raises(StateValueError):
            store.state_write(
                session_id,
                [
                    write("session", session_id, "a", "small"),
                    write("session", session_id, "b", "x" * 100),
                ],
                50,
            )
        assert store.state_scope("session", session_id) == {}
        # a batch's own earlier writes count towards the limit of its later ones
        with pytest.raises(StateValueError):
            store.state_write(
                session_id,
                [
                    write("session", session_id, "a", "x" * 30),
                    write("session", session_id, "b", "x" * 30),
                ],
                50,
            )
        assert store.state_scope("session", session_id) == {}

    def test_state_write_needs_a_writable_session(self, store: SessionStore) -> None:
        waiting = pending(store)
        assert put(store, waiting, "k", 1) == 1  # a pending session may be written
        closed, failed = opened(store), opened(store)
        assert store.end_session(closed, SessionStatus.CLOSED, "completed")
        assert store.end_session(failed, SessionStatus.FAILED, "worker_lost")
        with pytest.raises(SessionClosed) as closed_info:
            put(store, closed, "k", 1)
        assert closed_info.value.reason == "completed"
        with pytest.raises(SessionFailed) as failed_info:
            store.state_write(failed, [write("user", "u1", "k", 1)], BIG)
        assert failed_info.value.reason == "worker_lost"
        with pytest.raises(SessionNotFound):
            put(store, "no-such-session", "k", 1)
        assert store.state_read("session", closed, "k") == (MISSING, 0)
        assert store.state_read("user", "u1", "k") == (MISSING, 0)

    def test_create_after_a_conflicted_merge(self, store: SessionStore) -> None:
        """A merge that was refused leaves no trace a compare-and-set would trip over."""
        session_id = opened(store, merge_policy="raise")
        put(store, session_id, "k", 1)
        send(store, session_id, "m0", "m1", groups=(GroupSpec("g", 2, True),))
        put(store, session_id, "k", 2)  # live value moved since the snapshot
        assert store.branch_done("g", 0, 0, [("set", "k", 5), ("set", "fresh", 1)], rules) is None
        error = store.branch_done("g", 1, 0, [("set", "other", 1)], rules)
        assert isinstance(error, StateConflict)
        assert store.state_read("session", session_id, "fresh") == (MISSING, 0)
        created = store.state_write(session_id, [write("session", session_id, "fresh", 7, 0)], BIG)
        assert created == {"fresh": 1}
        assert store.state_read("session", session_id, "fresh") == (7, 1)
        assert store.state_write(session_id, [write("session", session_id, "other", 7, 0)], BIG)

    # -- state: atomic operations and clearing ------------------------------------------

    def test_state_atomic_increment_and_append(self, store: SessionStore) -> None:
        session_id = opened(store)
        assert (
            store.state_atomic(session_id, "session", session_id, ("increment", "n", 1), BIG, BIG)
            == 1
        )
        assert (
            store.state_atomic(session_id, "session", session_id, ("increment", "n", 2.5), BIG, BIG)
            == 3.5
        )
        assert store.state_read("session", session_id, "n") == (3.5, 2)
        assert store.state_atomic(
            session_id, "user", "u1", ("append", "l", {"a": 1}), BIG, BIG
        ) == [{"a": 1}]
        assert store.state_atomic(session_id, "user", "u1", ("append", "l", 2), BIG, BIG) == [
            {"a": 1},
            2,
        ]
        assert store.state_read("user", "u1", "l") == ([{"a": 1}, 2], 2)
        put(store, session_id, "n", MISSING)
        assert (
            store.state_atomic(session_id, "session", session_id, ("increment", "n", 1), BIG, BIG)
            == 1
        )
        assert store.state_read("session", session_id, "n") == (1, 4)

    def test_state_atomic_refuses_what_does_not_fit(self, store: SessionStore) -> None:
        session_id = opened(store)
        put(store, session_id, "s", "text")
        with pytest.raises(StateValueError):
            store.state_atomic(session_id, "session", session_id, ("increment", "s", 1), BIG, BIG)
        with pytest.raises(StateValueError):
            store.state_atomic(session_id, "session", session_id, ("append", "s", 1), BIG, BIG)
        assert store.state_read("session", session_id, "s") == ("text", 1)
        with pytest.raises(StateValueError, match="state_max_value_bytes"):
            store.state_atomic(
                session_id, "session", session_id, ("append", "l", "x" * 20), 10, BIG
            )
        assert store.state_read("session", session_id, "l") == (MISSING, 0)
        with pytest.raises(StateValueError, match="state_max_session_bytes"):
            store.state_atomic(session_id, "session", session_id, ("append", "l", "x" * 6), BIG, 10)
        assert store.state_read("session", session_id, "l") == (MISSING, 0)

    def test_state_atomic_needs_a_writable_session(self, store: SessionStore) -> None:
        closed = opened(store)
        assert store.end_session(closed, SessionStatus.CLOSED, "completed")
        with pytest.raises(SessionClosed):
            store.state_atomic(closed, "user", "u1", ("increment", "n", 1), BIG, BIG)
        with pytest.raises(SessionNotFound):
            store.state_atomic("no-such-session", "app", "", ("increment", "n", 1), BIG, BIG)
        assert store.state_read("user", "u1", "n") == (MISSING, 0)
        waiting = pending(store)
        assert store.state_atomic(waiting, "session", waiting, ("increment", "n", 1), BIG, BIG) == 1

    def test_state_clear(self, store: SessionStore) -> None:
        session_id, other = opened(store), opened(store)
        put(store, session_id, "a", 1)
        put(store, session_id, "b", 2)
        put(store, session_id, "b", MISSING)
        put(store, other, "a", 1)
        store.state_write(session_id, [write("user", "u1", "a", 1)], BIG)
        store.state_clear(session_id)
        assert store.state_scope("session", session_id) == {}
        assert store.state_read("session", session_id, "a") == (MISSING, 2)
        assert store.state_read("session", session_id, "b") == (MISSING, 2)  # untouched
        assert store.state_scope("session", other) == {"a": (1, 1)}
        assert store.state_scope("user", "u1") == {"a": (1, 1)}
        assert store.end_session(other, SessionStatus.CLOSED, "completed")
        with pytest.raises(SessionClosed):
            store.state_clear(other)
        with pytest.raises(SessionNotFound):
            store.state_clear("no-such-session")
        assert store.state_scope("session", other) == {"a": (1, 1)}

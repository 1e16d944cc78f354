"""Sessions: schema and process, creation, admission, listing, moves."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sessionflow.enums import Reason, SessionStatus, TaskStatus
from sessionflow.records import NewSession, utcnow
from sessionflow.store.base import SessionStore
from sessionflow.store.sql.migrate import head_revision

from .helpers import (
    NODE,
    NODE2,
    QUEUE,
    QUEUE2,
    T0,
    Contract,
    close_to,
    opened,
    pending,
    register,
    run,
    send,
    sid,
    statuses_of,
)


def new_one(session_id: str | None = None) -> NewSession:
    return NewSession(
        id=session_id or sid(), created_at=utcnow(), creation_timeout=1.0, execution_timeout=9.0
    )


class SessionsContract(Contract):
    """Sessions: schema and process, creation, admission, listing, moves."""

    # -- schema and process ---------------------------------------------------------

    def test_upgrade_and_revision_name_the_head(self, store: SessionStore) -> None:
        assert store.upgrade() == head_revision()
        assert store.revision() == head_revision()
        assert store.dialect in ("sqlite", "postgresql", "memory")

    def test_secret_is_created_once(self, store: SessionStore) -> None:
        first = store.secret()
        assert isinstance(first, bytes) and len(first) == 32
        assert store.secret() == first

    def test_dispose_then_use_again(self, store: SessionStore) -> None:
        session_id = pending(store)
        store.dispose()
        found = store.get_session(session_id)
        assert found is not None and found.status is SessionStatus.PENDING

    # -- sessions --------------------------------------------------------------------

    def test_create_pending_keeps_every_option(self, store: SessionStore) -> None:
        created = utcnow()
        session_id = pending(
            store,
            created_at=created,
            creation_timeout=3.5,
            execution_timeout=60.0,
            heartbeat_timeout=4.0,
            user_id="u1",
            agent_id="a1",
            metadata={"k": [1, "two", None]},
            ttl=120.0,
            idle_timeout=30.0,
            max_turns=9,
            survive_restart=True,
            affinity="soft",
            merge_policy="raise",
            reducers={"n": "sum"},
            target_worker=NODE,
            recreated_from="older",
        )
        found = store.get_session(session_id)
        assert found is not None
        assert (found.status, found.reason, found.hostname, found.queue) == (
            SessionStatus.PENDING,
            None,
            None,
            None,
        )
        assert (found.user_id, found.agent_id, found.metadata) == (
            "u1",
            "a1",
            {"k": [1, "two", None]},
        )
        assert (found.creation_timeout, found.execution_timeout, found.heartbeat_timeout) == (
            3.5,
            60.0,
            4.0,
        )
        assert (found.ttl, found.idle_timeout, found.max_turns, found.turns) == (120, 30, 9, 0)
        assert found.survive_restart is True and found.affinity == "soft"
        assert (found.merge_policy, found.reducers) == ("raise", {"n": "sum"})
        assert (found.target_worker, found.recreated_from) == (NODE, "older")
        assert found.created_at == created
        assert found.opened_at is found.deadline_at is found.expires_at is found.closed_at is None
        assert found.settled is True and found.moving is False
        assert found.last_heartbeat_at is None

    def test_create_pending_twice_changes_nothing(self, store: SessionStore) -> None:
        session_id = pending(store, user_id="first")
        again = NewSession(
            id=session_id,
            created_at=utcnow(),
            creation_timeout=1.0,
            execution_timeout=9.0,
            user_id="second",
        )
        assert store.create_pending(again) is False
        assert store.session_user(session_id) == "first"

    def test_a_pending_row_written_late_or_early_opens_or_fails_once(
        self, store: SessionStore
    ) -> None:
        """request_session writes its pending row in the background: the admitting
        worker or the abandoning sweeper may come before or after it."""
        early = NewSession(
            id=sid(), created_at=utcnow(), creation_timeout=1.0, execution_timeout=9.0
        )
        assert store.create_pending(early)
        opened_ = store.open_new(early, NODE, QUEUE)
        assert opened_ is not None and opened_.status is SessionStatus.OPEN
        assert store.create_pending(early) is False  # the late pending row changes nothing
        assert store.abandon_new(early, "creation_timeout") is False
        gone = NewSession(
            id=sid(), created_at=utcnow(), creation_timeout=1.0, execution_timeout=9.0
        )
        assert store.create_pending(gone)
        assert store.abandon_new(gone, "creation_timeout") is True
        assert store.open_new(gone, NODE, QUEUE) is None
        moving = opened(store, affinity="soft")
        assert store.begin_move(moving, NODE) is not None
        record = store.get_session(moving)
        assert record is not None
        twin = NewSession(
            id=moving, created_at=utcnow(), creation_timeout=1.0, execution_timeout=9.0
        )
        assert store.open_new(twin, NODE2, QUEUE2) is None  # a move is admitted, not re-created

    def test_stale_pending(self, store: SessionStore) -> None:
        old = pending(store, created_at=utcnow() - timedelta(seconds=30), creation_timeout=5.0)
        pending(store, creation_timeout=600.0)
        moving = opened(store, affinity="soft")
        store.begin_move(moving, NODE)
        assert [n.id for n in store.stale_pending()] == [old]

    def test_stale_pending_gives_back_the_whole_specification(self, store: SessionStore) -> None:
        """The SQL store dropped the placement fields (requires, constraints, prefer,
        placement) from the specifications it gave back."""
        new = NewSession(
            id=sid(),
            created_at=utcnow() - timedelta(seconds=30),
            creation_timeout=5.0,
            execution_timeout=9.0,
            user_id="u",
            agent_id="a",
            metadata={"k": [1]},
            ttl=60.0,
            idle_timeout=30.0,
            max_turns=4,
            survive_restart=True,
            affinity="soft",
            merge_policy="reducers",
            reducers={"n": "sum"},
            requires={"gpu": 1},
            constraints={"zone": ["eq", "eu"]},
            prefer=[["label", "zone", "eu"]],
            placement="pack",
        )
        assert store.create_pending(new)
        assert store.stale_pending() == [new]

    def test_records_are_copies(self, store: SessionStore) -> None:
        metadata = {"list": [1]}
        session_id = pending(store, metadata=metadata)
        metadata["list"].append(2)
        found = store.get_session(session_id)
        assert found is not None and found.metadata == {"list": [1]}
        assert found.metadata is not None
        found.metadata["list"].append(3)
        again = store.get_session(session_id)
        assert again is not None and again.metadata == {"list": [1]}

    def test_get_session_unknown_is_none(self, store: SessionStore) -> None:
        assert store.get_session("no-such-session") is None
        assert store.get_session("no-such-session", with_heartbeat=True) is None

    def test_get_session_with_heartbeat_of_its_worker(self, store: SessionStore) -> None:
        register(store, NODE)
        beat = utcnow() - timedelta(seconds=7)
        store.heartbeat(NODE, at=beat)
        session_id = opened(store)
        with_beat = store.get_session(session_id, with_heartbeat=True)
        assert with_beat is not None and with_beat.last_heartbeat_at == beat
        plain = store.get_session(session_id)
        assert plain is not None and plain.last_heartbeat_at is None
        waiting = store.get_session(pending(store), with_heartbeat=True)
        assert waiting is not None and waiting.last_heartbeat_at is None
        unregistered = store.get_session(opened(store, node=NODE2), with_heartbeat=True)
        assert unregistered is not None and unregistered.last_heartbeat_at is None

    def test_list_sessions_filters_and_order(self, store: SessionStore) -> None:
        at = [T0 + timedelta(seconds=i) for i in range(6)]
        a = opened(store, created_at=at[0], user_id="u1", agent_id="x")
        b = opened(store, node=NODE2, queue=QUEUE2, created_at=at[1], user_id="u2")
        c = opened(store, created_at=at[2], user_id="u1", affinity="soft")
        d = opened(store, created_at=at[3], user_id="u1")
        pending(store, created_at=at[4], user_id="u1")  # new and pending: never listed
        e = pending(store, created_at=at[5], user_id="u1", target_worker=NODE)
        assert store.end_session(d, SessionStatus.CLOSED, "completed")
        assert store.begin_move(c, NODE) is not None  # moving: listed as open
        assert store.abandon_pending(e, "creation_timeout")

        def ids(**filters: Any) -> list[str]:
            return [r.id for r in store.list_sessions(**filters)]

        assert ids() == [a, b, c, d, e]
        assert ids(newest_first=True) == [e, d, c, b, a]
        assert ids(status=SessionStatus.OPEN) == [a, b, c]
        assert ids(status=SessionStatus.CLOSED) == [d]
        assert ids(status=SessionStatus.FAILED) == [e]
        assert ids(status=SessionStatus.PENDING) == [c]
        assert ids(user_id="u1") == [a, c, d, e]
        assert ids(agent_id="x") == [a]
        assert ids(hostname=NODE2) == [b]
        assert ids(created_after=at[1]) == [b, c, d, e]
        assert ids(created_before=at[1]) == [a]
        assert ids(created_after=at[1], created_before=at[3]) == [b, c]
        assert ids(limit=2) == [a, b]
        assert ids(limit=2, newest_first=True) == [e, d]
        assert ids(user_id="nobody") == []

    def test_list_sessions_ties_break_by_id(self, store: SessionStore) -> None:
        made = sorted(opened(store, created_at=T0) for _ in range(4))
        assert [r.id for r in store.list_sessions()] == made
        assert [r.id for r in store.list_sessions(newest_first=True)] == made[::-1]

    def test_statuses_of_existing_sessions(self, store: SessionStore) -> None:
        a, b = opened(store), pending(store)
        assert store.end_session(a, SessionStatus.FAILED, "worker_lost")
        assert store.statuses([a, b, "no-such-session", a]) == {
            a: (SessionStatus.FAILED, "worker_lost"),
            b: (SessionStatus.PENDING, None),
        }
        assert store.statuses([]) == {}

    def test_abandon_pending(self, store: SessionStore) -> None:
        session_id = pending(store)
        assert store.abandon_pending(session_id, "creation_timeout") is True
        found = store.get_session(session_id)
        assert found is not None
        assert (found.status, found.reason) == (SessionStatus.FAILED, "creation_timeout")
        assert found.settled and close_to(found.closed_at, store.clock())
        assert store.abandon_pending(session_id, "again") is False
        assert store.abandon_pending("no-such-session", "x") is False
        assert store.abandon_pending(opened(store), "creation_timeout") is False
        assert store.unsettled() == []

    def test_abandon_pending_as_closed(self, store: SessionStore) -> None:
        """A requested session its caller completed before any worker took it."""
        session_id = pending(store)
        assert store.abandon_pending(session_id, "completed", status=SessionStatus.CLOSED)
        found = store.get_session(session_id)
        assert found is not None and found.settled
        assert (found.status, found.reason) == (SessionStatus.CLOSED, "completed")
        assert store.admit(session_id, "w1@host", "q") is None
        assert store.unsettled() == []

    def test_open_new_inserts_an_open_session_once(self, store: SessionStore) -> None:
        created = utcnow() - timedelta(seconds=5)
        new = NewSession(
            id=sid(),
            created_at=created,
            creation_timeout=10.0,
            execution_timeout=60.0,
            ttl=100.0,
            user_id="u",
            metadata={"k": [1]},
        )
        before = store.clock()
        record = store.open_new(new, NODE, QUEUE)
        assert record is not None and record.id == new.id
        assert (record.status, record.hostname, record.queue) == (SessionStatus.OPEN, NODE, QUEUE)
        assert record.opened_at is not None and close_to(record.opened_at, before)
        assert record.deadline_at == record.opened_at + timedelta(seconds=60)
        assert record.expires_at == created + timedelta(seconds=100)
        assert (record.user_id, record.metadata) == ("u", {"k": [1]})
        assert store.open_new(new, NODE2, QUEUE2) is None  # one insert wins
        assert store.abandon_new(new, "creation_timeout") is False  # admitted: stays open
        found = store.get_session(new.id)
        assert found is not None and (found.status, found.hostname) == (SessionStatus.OPEN, NODE)

    def test_abandon_new_records_the_failure_once(self, store: SessionStore) -> None:
        new = NewSession(id=sid(), created_at=utcnow(), creation_timeout=1.0, execution_timeout=9.0)
        assert store.abandon_new(new, "creation_timeout") is True
        assert store.open_new(new, NODE, QUEUE) is None  # a late worker cannot open it
        found = store.get_session(new.id)
        assert found is not None
        assert (found.status, found.reason, found.opened_at) == (
            SessionStatus.FAILED,
            "creation_timeout",
            None,
        )
        assert found.settled and store.unsettled() == []
        assert store.abandon_new(new, "creation_timeout") is False

    def test_open_new_vs_abandon_new_from_threads(self, store: SessionStore) -> None:
        def race(new: NewSession) -> list[object]:
            results: list[object] = []
            threads = [
                threading.Thread(target=lambda: results.append(store.open_new(new, NODE, QUEUE))),
                threading.Thread(
                    target=lambda: results.append(store.abandon_new(new, "creation_timeout"))
                ),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            return results

        for _ in range(10):
            new = NewSession(
                id=sid(), created_at=utcnow(), creation_timeout=1.0, execution_timeout=9.0
            )
            results = race(new)
            winners = [r for r in results if r is not None and r is not False]
            assert len(winners) == 1, results  # exactly one of the two inserts happened

    def test_abandon_pending_refuses_a_moving_session(self, store: SessionStore) -> None:
        session_id = opened(store, affinity="soft")
        assert store.begin_move(session_id, NODE) is not None
        assert store.abandon_pending(session_id, "creation_timeout") is False
        found = store.get_session(session_id)
        assert found is not None and found.moving

    def test_admit_opens_with_its_clocks(self, store: SessionStore) -> None:
        created = utcnow() - timedelta(seconds=5)
        session_id = pending(store, created_at=created, execution_timeout=60.0, ttl=100.0)
        before = store.clock()
        record = store.admit(session_id, NODE, QUEUE)
        assert record is not None and record.id == session_id
        assert (record.status, record.hostname, record.queue, record.reason) == (
            SessionStatus.OPEN,
            NODE,
            QUEUE,
            None,
        )
        assert record.opened_at is not None and close_to(record.opened_at, before)
        assert record.deadline_at == record.opened_at + timedelta(seconds=60)
        assert record.expires_at == created + timedelta(seconds=100)
        assert store.get_session(session_id) == record
        no_ttl = store.admit(pending(store), NODE, QUEUE)
        assert no_ttl is not None and no_ttl.expires_at is None

    def test_admit_only_pending_sessions(self, store: SessionStore) -> None:
        assert store.admit("no-such-session", NODE, QUEUE) is None
        already = opened(store)
        assert store.admit(already, NODE2, QUEUE2) is None
        found = store.get_session(already)
        assert found is not None and found.hostname == NODE
        abandoned = pending(store)
        assert store.abandon_pending(abandoned, "creation_timeout")
        assert store.admit(abandoned, NODE, QUEUE) is None
        assert store.statuses([abandoned])[abandoned][0] is SessionStatus.FAILED

    def test_admit_respects_the_target_worker(self, store: SessionStore) -> None:
        session_id = pending(store, target_worker=NODE2)
        assert store.admit(session_id, NODE, QUEUE) is None
        assert store.statuses([session_id])[session_id][0] is SessionStatus.PENDING
        record = store.admit(session_id, NODE2, QUEUE2)
        assert record is not None and record.hostname == NODE2

    def test_a_moved_session_keeps_its_clocks(self, store: SessionStore) -> None:
        session_id = opened(store, affinity="soft", ttl=500.0)
        first = store.get_session(session_id)
        assert first is not None
        assert store.begin_move(session_id, NODE) is not None
        moved = store.admit(session_id, NODE2, QUEUE2)
        assert moved is not None
        assert (moved.status, moved.reason, moved.hostname, moved.queue) == (
            SessionStatus.OPEN,
            None,
            NODE2,
            QUEUE2,
        )
        assert (moved.opened_at, moved.deadline_at, moved.expires_at) == (
            first.opened_at,
            first.deadline_at,
            first.expires_at,
        )

    def test_open_sessions_of_a_worker(self, store: SessionStore) -> None:
        a, b = opened(store), opened(store)
        opened(store, node=NODE2, queue=QUEUE2)
        assert store.end_session(b, SessionStatus.CLOSED, "completed")
        assert [r.id for r in store.open_sessions(NODE)] == [a]
        assert store.open_sessions("nobody@host") == []

    def test_open_ids_of_a_worker(self, store: SessionStore) -> None:
        a, b, c = opened(store), opened(store), opened(store, affinity="soft")
        opened(store, node=NODE2, queue=QUEUE2)
        pending(store)
        assert store.open_ids(NODE) == {a, b, c}
        assert store.end_session(b, SessionStatus.FAILED, "worker_lost")
        store.begin_move(c, NODE)  # moving away: pending until another worker admits it
        assert store.open_ids(NODE) == {a}
        assert store.open_ids("nobody@host") == set()

    def test_session_user(self, store: SessionStore) -> None:
        assert store.session_user(pending(store, user_id="alice")) == "alice"
        assert store.session_user(pending(store)) is None
        assert store.session_user("no-such-session") is None

    # -- moves -----------------------------------------------------------------------

    def test_begin_move_detaches_and_loses_running_tasks(self, store: SessionStore) -> None:
        session_id = opened(store, affinity="soft")
        send(store, session_id, "running", "queued")
        store.record_runs([run(session_id, "running")])
        assert store.begin_move(session_id, NODE2) is None  # not that worker's
        ended = store.begin_move(session_id, NODE)
        assert ended is not None
        assert (ended.session_id, ended.status, ended.reason) == (
            session_id,
            SessionStatus.FAILED,
            Reason.WORKER_LOST.value,
        )
        assert (ended.cancelled, ended.lost) == ((), ("running",))
        found = store.get_session(session_id)
        assert found is not None
        assert (found.status, found.reason, found.hostname, found.queue) == (
            SessionStatus.PENDING,
            Reason.MOVING.value,
            None,
            None,
        )
        assert found.moving and found.settled
        assert statuses_of(store, session_id) == {
            "running": TaskStatus.LOST,
            "queued": TaskStatus.PENDING,
        }
        assert store.open_sessions(NODE) == []
        assert send(store, session_id, "late") is None
        assert store.begin_move(session_id, NODE) is None  # once

    def test_begin_move_only_open_sessions(self, store: SessionStore) -> None:
        assert store.begin_move("no-such-session", NODE) is None
        assert store.begin_move(pending(store), NODE) is None
        closed = opened(store)
        assert store.end_session(closed, SessionStatus.CLOSED, "completed")
        assert store.begin_move(closed, NODE) is None

    def test_stalled_moves(self, store: SessionStore) -> None:
        stalled = opened(store, affinity="soft", creation_timeout=0.0)
        waiting = opened(store, affinity="soft", creation_timeout=3600.0)
        pending(store, creation_timeout=0.0)  # new, not moving
        assert store.stalled_moves() == []
        for session_id in (stalled, waiting):
            assert store.begin_move(session_id, NODE) is not None
        assert store.stalled_moves() == [stalled]
        assert store.admit(stalled, NODE2, QUEUE2) is not None
        assert store.stalled_moves() == []

"""Placement: what workers offer and what sessions asked for, kept and added up."""

from __future__ import annotations

from sessionflow.enums import Reason, SessionStatus
from sessionflow.records import NewSession, utcnow
from sessionflow.store.base import SessionStore

from .helpers import NODE, NODE2, QUEUE, QUEUE2, Contract, opened, pending, register, sid

EU = {"zone": ["==", "eu"], "vram": [">=", 24]}
PREFER = [[5, {"model": ["in", ["llama3", "mistral"]]}], [-1, {"spot": ["==", "yes"]}]]


def placed_new(**options: object) -> NewSession:
    values: dict[str, object] = {
        "id": sid(),
        "created_at": utcnow(),
        "creation_timeout": 10.0,
        "execution_timeout": 600.0,
        "requires": {"gpu": 1, "browser": 2},
        "constraints": EU,
        "prefer": PREFER,
        "placement": "pack",
        **options,
    }
    return NewSession(**values)  # type: ignore[arg-type]


class PlacementContract(Contract):
    """Placement: what workers offer and what sessions asked for, kept and added up."""

    def test_workers_keep_capacities_and_labels(self, store: SessionStore) -> None:
        store.register_worker(
            NODE,
            host="h",
            pid=1,
            queue=QUEUE,
            max_sessions=4,
            is_alive=lambda *_: True,
            resources={"gpu": 2, "browser": 8},
            labels={"zone": "eu"},
        )
        register(store, NODE2)  # declares nothing
        first, second = store.workers()
        assert (first.resources, first.labels, first.usage) == (
            {"gpu": 2, "browser": 8},
            {"zone": "eu"},
            {},
        )
        assert (second.resources, second.labels, second.usage) == ({}, {}, {})
        store.heartbeat(NODE, max_sessions=5)  # None: unchanged
        assert store.workers()[0].resources == {"gpu": 2, "browser": 8}
        store.heartbeat(NODE, resources={"gpu": 1}, labels={})
        assert (store.workers()[0].resources, store.workers()[0].labels) == ({"gpu": 1}, {})

    def test_sessions_keep_what_they_asked_for(self, store: SessionStore) -> None:
        new = placed_new()
        found = store.open_new(new, NODE, QUEUE)
        assert found is not None
        again = store.get_session(new.id)
        for record in (found, again):
            assert record is not None
            assert record.requires == {"gpu": 1, "browser": 2}
            assert (record.constraints, record.prefer, record.placement) == (EU, PREFER, "pack")
        plain = store.get_session(opened(store))
        assert plain is not None
        assert (plain.requires, plain.constraints, plain.prefer, plain.placement) == (
            None,
            None,
            None,
            None,
        )
        waiting = pending(store, requires={"gpu": 3}, constraints={"zone": ["!=", "us"]})
        admitted = store.admit(waiting, NODE2, QUEUE2)
        assert admitted is not None and admitted.requires == {"gpu": 3}
        assert admitted.constraints == {"zone": ["!=", "us"]}

    def test_usage_adds_up_the_open_sessions_of_each_worker(self, store: SessionStore) -> None:
        register(store, NODE)
        register(store, NODE2)
        for _ in range(2):
            assert store.open_new(placed_new(requires={"gpu": 1, "browser": 2}), NODE, QUEUE)
        assert store.open_new(placed_new(requires={"gpu": 2}), NODE2, QUEUE2)
        opened(store)  # asks for nothing: counts as a session only
        ended = placed_new(requires={"gpu": 5})
        assert store.open_new(ended, NODE, QUEUE)
        assert store.end_session(ended.id, SessionStatus.CLOSED, "completed")
        pending(store, requires={"gpu": 7})  # not on any worker yet
        moved = placed_new(requires={"browser": 1}, affinity="soft")
        assert store.open_new(moved, NODE, QUEUE)
        assert store.begin_move(moved.id, NODE) is not None  # no longer on NODE
        assert store.abandon_new(placed_new(requires={"gpu": 9}), "creation_timeout")
        usage = {w.nodename: (w.usage, w.open_sessions) for w in store.workers()}
        assert usage == {NODE: ({"gpu": 2, "browser": 4}, 3), NODE2: ({"gpu": 2}, 1)}

    def test_moving_lists_the_sessions_changing_workers(self, store: SessionStore) -> None:
        assert store.moving() == []
        soft = placed_new(affinity="soft")
        assert store.open_new(soft, NODE, QUEUE)
        still = opened(store, affinity="soft")
        pending(store)  # new, not moving
        assert store.begin_move(soft.id, NODE) is not None
        (record,) = store.moving()
        assert (record.id, record.reason, record.moving) == (soft.id, Reason.MOVING.value, True)
        assert record.requires == soft.requires and record.constraints == EU
        assert store.admit(soft.id, NODE2, QUEUE2) is not None
        assert store.moving() == []
        assert still not in {r.id for r in store.moving()}

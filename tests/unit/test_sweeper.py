"""The sweeper, deterministically: a MemoryStore on a hand-driven clock, and session
queues kept in lists instead of a broker.

Two sweepers racing on the same dead worker must not mark each other's parked
tasks lost: the lease lets one sweep at a time, a sweeper that lost its lease is
fenced off from marking tasks lost, and only the sweep that moved a session looks
for its missing tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kombu.entity import Queue

from sessionflow import sweeper as sweeper_module
from sessionflow.canvas import make_queue
from sessionflow.config import Config
from sessionflow.enums import Reason, SessionStatus, TaskStatus
from sessionflow.queues import Queues
from sessionflow.records import Dispatch, Ended, NewSession, Run, utcnow
from sessionflow.results import Resolver
from sessionflow.retention import prune as retention_prune
from sessionflow.store.memory import MemoryStore
from sessionflow.sweeper import LEASE, Sweeper

DEAD = "dead@host"
CONFIG = Config(heartbeat_interval=1.0, monitor_interval=0.5)  # lease: 2.5 s
DEAD_QUEUE = CONFIG.worker_queue(DEAD)
Message = tuple[str, str | None]  # (task id, session id)


class Clock:
    """Wall clock and monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = utcnow().replace(microsecond=0)
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


class FakeQueues:
    """The broker side of :class:`~sessionflow.queues.Queues`, as lists of messages.

    ``during_sort`` runs once while a sort holds the messages it took off the
    queue (as a real sort does between taking them and acknowledging them).
    """

    def __init__(self) -> None:
        self.queues: dict[str, list[Message]] = {}
        self.dropped: list[str] = []
        self.during_sort: Callable[[], None] | None = None

    def publish(self, queue: str, *messages: Message) -> None:
        self.queues.setdefault(queue, []).extend(messages)

    def parking_queue(self, session_id: str) -> Queue:
        return make_queue(f"{CONFIG.queue_prefix}.parked.{session_id}")

    def parked(self, session_id: str) -> list[str]:
        return [t for t, _ in self.queues.get(self.parking_queue(session_id).name, [])]

    def sort(self, name: str, destination: Callable[[str | None], Queue | None]) -> set[str]:
        held = self.queues.pop(name, [])
        hook, self.during_sort = self.during_sort, None
        if hook is not None:
            hook()
        for task_id, session_id in held:
            target = destination(session_id)
            if target is None:
                self.dropped.append(task_id)
            else:
                self.publish(target.name, (task_id, session_id))
        return {task_id for task_id, _ in held}

    def drop_parked(self, session_id: str) -> None:
        self.queues.pop(self.parking_queue(session_id).name, None)


@dataclass
class FakeResolver:
    """Records what a sweeper resolves instead of storing results."""

    ended: list[Ended] = field(default_factory=list)

    def resolve(self, ended: Ended) -> None:
        self.ended.append(ended)

    def lost(self) -> set[str]:
        return {task for e in self.ended for task in e.lost}


@dataclass
class Node:
    """One process that sweeps: its sweeper, resolver and admission requests."""

    sweeper: Sweeper
    resolver: FakeResolver
    admissions: list[tuple[tuple[Any, ...], dict[str, Any]]]

    def tick(self) -> bool:
        return self.sweeper.tick()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(sweeper_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(sweeper_module, "utcnow", clock)
    return clock


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    store = MemoryStore(clock=clock)
    store.register_worker(
        DEAD, host="host", pid=1, queue=DEAD_QUEUE, max_sessions=10, is_alive=lambda *_: True
    )
    return store


@pytest.fixture
def queues() -> FakeQueues:
    return FakeQueues()


@pytest.fixture
def make_node(store: MemoryStore, queues: FakeQueues) -> Iterator[Callable[[str], Node]]:
    def make(holder: str) -> Node:
        resolver = FakeResolver()
        admissions: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        sweeper = Sweeper(
            store,
            cast(Queues, queues),
            cast(Resolver, resolver),
            CONFIG,
            lambda *args, **kwargs: admissions.append((args, kwargs)),
            holder=holder,
        )
        return Node(sweeper, resolver, admissions)

    yield make


def session(
    store: MemoryStore,
    clock: Clock,
    name: str,
    *,
    affinity: str,
    heartbeat_timeout: float = 5.0,
    queued: tuple[str, ...] = (),
    running: tuple[str, ...] = (),
) -> str:
    """An open session on the dead worker with its tasks registered (and some running)."""
    store.create_pending(
        NewSession(
            id=name,
            created_at=clock.now,
            creation_timeout=30.0,
            execution_timeout=3600.0,
            heartbeat_timeout=heartbeat_timeout,
            affinity=affinity,
        )
    )
    assert store.admit(name, DEAD, DEAD_QUEUE) is not None
    send(store, clock, name, *running, *queued)
    store.record_runs([Run(t, 0, name, "app.task", "STARTED", DEAD, clock.now) for t in running])
    return name


def send(store: MemoryStore, clock: Clock, session_id: str, *task_ids: str) -> None:
    tasks = tuple((t, "app.task") for t in task_ids)
    assert store.dispatch(Dispatch(session_id, tasks, at=clock.now)) == DEAD_QUEUE


def statuses(store: MemoryStore, session_id: str) -> dict[str, TaskStatus]:
    return {t.task_id: t.status for t in store.tasks(session_id)}


def status(store: MemoryStore, session_id: str) -> tuple[SessionStatus, str | None]:
    return store.statuses([session_id])[session_id]


# -- one sweeper ----------------------------------------------------------------------------


def test_a_silent_worker_is_swept(
    store: MemoryStore, clock: Clock, queues: FakeQueues, make_node: Callable[[str], Node]
) -> None:
    hard = session(
        store, clock, "hard", affinity="hard", running=("h-run",), queued=("h-q1", "h-q2")
    )
    soft = session(
        store, clock, "soft", affinity="soft", running=("s-run",), queued=("s-q1", "s-q2")
    )
    # s-q2 was prefetched by the dead worker and its message is gone with it
    queues.publish(DEAD_QUEUE, ("h-q1", hard), ("h-q2", hard), ("s-q1", soft))
    node = make_node("a")
    assert node.tick() is True  # nothing silent yet; the store answers from now on
    assert node.resolver.ended == []
    clock.advance(4)
    assert node.tick() is True  # silent, but not for a whole heartbeat_timeout yet
    assert status(store, hard)[0] is SessionStatus.OPEN and node.resolver.ended == []

    clock.advance(2)
    assert node.tick() is True

    assert status(store, hard) == (SessionStatus.FAILED, Reason.WORKER_LOST.value)
    assert store.unsettled() == []
    assert statuses(store, hard) == {
        "h-run": TaskStatus.LOST,
        "h-q1": TaskStatus.CANCELLED,
        "h-q2": TaskStatus.CANCELLED,
    }
    assert status(store, soft) == (SessionStatus.PENDING, Reason.MOVING.value)
    assert statuses(store, soft) == {
        "s-run": TaskStatus.LOST,
        "s-q1": TaskStatus.PENDING,
        "s-q2": TaskStatus.LOST,
    }
    resolved = sorted(
        (e.session_id, e.status, e.reason, sorted(e.cancelled), e.lost) for e in node.resolver.ended
    )
    assert resolved == [
        (hard, SessionStatus.FAILED, "worker_lost", ["h-q1", "h-q2"], ("h-run",)),
        (soft, SessionStatus.FAILED, "worker_lost", [], ("s-run",)),  # begin_move
        (soft, SessionStatus.OPEN, "worker_lost", [], ("s-q2",)),  # missing from the queue
    ]
    assert queues.parked(soft) == ["s-q1"]
    assert sorted(queues.dropped) == ["h-q1", "h-q2"]
    assert queues.queues.get(DEAD_QUEUE, []) == []
    assert node.admissions == [((soft,), {"move": True})]

    clock.advance(1)
    assert node.tick() is True  # nothing left to do there
    assert len(node.resolver.ended) == 3 and len(node.admissions) == 1


def test_a_task_still_running_after_a_warm_shutdown_is_lost_when_the_worker_dies(
    store: MemoryStore, clock: Clock, make_node: Callable[[str], Node]
) -> None:
    """SIGTERM ended and settled the session (its long task runs on), then SIGKILL:
    the task is lost once the worker has been silent for the session's timeout (it
    waited forever before); while the worker still beats, nothing is lost."""
    ended = session(store, clock, "ended", affinity="hard", running=("long",))
    assert store.end_session(ended, SessionStatus.FAILED, Reason.WORKER_SHUTDOWN.value)
    assert store.settle(ended, running=["long"]) is not None
    store.worker_offline(DEAD)
    node = make_node("a")
    assert node.tick() is True
    for _ in range(3):  # finishing its tasks: heartbeats go on, the worker stays offline
        clock.advance(4)
        store.heartbeat(DEAD, online=False)
        assert node.tick() is True
    assert node.resolver.ended == [] and statuses(store, ended) == {"long": TaskStatus.STARTED}
    clock.advance(4)  # killed: silent, but not for heartbeat_timeout yet
    assert node.tick() is True and node.resolver.ended == []
    clock.advance(2)
    assert node.tick() is True
    assert [(e.session_id, e.reason, e.lost) for e in node.resolver.ended] == [
        (ended, Reason.WORKER_SHUTDOWN.value, ("long",))
    ]
    assert statuses(store, ended) == {"long": TaskStatus.LOST}
    clock.advance(1)
    assert node.tick() is True and len(node.resolver.ended) == 1


def test_a_moved_session_with_no_message_left_is_resolved(
    store: MemoryStore, clock: Clock, queues: FakeQueues, make_node: Callable[[str], Node]
) -> None:
    """Every queued message of the session was prefetched and lost: still resolved."""
    soft = session(store, clock, "soft", affinity="soft", queued=("s-q1", "s-q2"))
    node = make_node("a")
    node.tick()
    clock.advance(6)
    node.tick()
    assert statuses(store, soft) == {"s-q1": TaskStatus.LOST, "s-q2": TaskStatus.LOST}
    assert node.resolver.lost() == {"s-q1", "s-q2"}
    assert node.admissions == [((soft,), {"move": True})]


def test_a_later_sweep_leaves_parked_tasks_alone(
    store: MemoryStore, clock: Clock, queues: FakeQueues, make_node: Callable[[str], Node]
) -> None:
    """A message of the moved session that reached the dead queue late is parked by
    the next sweep, which does not take the tasks parked before it for lost."""
    soft = session(store, clock, "soft", affinity="soft", queued=("s-q1",))
    other = session(store, clock, "other", affinity="hard", heartbeat_timeout=8.0)
    queues.publish(DEAD_QUEUE, ("s-q1", soft))
    node = make_node("a")
    node.tick()
    clock.advance(5.5)
    send(store, clock, soft, "s-late")  # registered; its message is on its way
    clock.advance(0.5)
    node.tick()  # soft moves; "other" waits for its longer heartbeat_timeout
    assert queues.parked(soft) == ["s-q1"]
    queues.publish(DEAD_QUEUE, ("s-late", soft))  # sent just before the move
    clock.advance(3)
    node.tick()  # "other" fails now, and the dead queue is drained again
    assert status(store, other)[0] is SessionStatus.FAILED
    assert queues.parked(soft) == ["s-q1", "s-late"]
    assert statuses(store, soft) == {"s-q1": TaskStatus.PENDING, "s-late": TaskStatus.PENDING}
    assert node.resolver.lost() == set()


# -- two sweepers ---------------------------------------------------------------------------


def test_one_sweeper_at_a_time(
    store: MemoryStore, clock: Clock, queues: FakeQueues, make_node: Callable[[str], Node]
) -> None:
    """While A holds the lease, B's tick does nothing, even when there is work to do."""
    hard = session(store, clock, "hard", affinity="hard", queued=("h-q1",))
    soft = session(store, clock, "soft", affinity="soft", queued=("s-q1",))
    queues.publish(DEAD_QUEUE, ("h-q1", hard), ("s-q1", soft))
    a, b = make_node("a"), make_node("b")
    for _ in range(6):
        assert a.tick() is True  # renews the lease every second
        assert b.tick() is False
        clock.advance(1)
    # Both sessions are due now (silent for 6 s > 5 s), and A's lease runs until +1.5 s.
    assert store.holds_lease(LEASE, "a") and not store.holds_lease(LEASE, "b")
    assert b.tick() is False
    assert status(store, hard)[0] is SessionStatus.OPEN
    assert status(store, soft)[0] is SessionStatus.OPEN
    assert b.resolver.ended == [] and b.admissions == []
    assert queues.queues[DEAD_QUEUE] == [("h-q1", hard), ("s-q1", soft)]
    assert queues.dropped == []

    assert a.tick() is True
    assert status(store, hard)[0] is SessionStatus.FAILED
    assert status(store, soft) == (SessionStatus.PENDING, Reason.MOVING.value)
    assert queues.parked(soft) == ["s-q1"] and queues.dropped == ["h-q1"]
    assert a.admissions == [((soft,), {"move": True})]
    assert b.tick() is False and b.resolver.ended == []

    clock.advance(3)  # A stopped renewing: B takes over
    assert b.tick() is True
    assert store.holds_lease(LEASE, "b") and not a.sweeper.still_holding()


def test_a_sweeper_that_lost_its_lease_marks_nothing_lost(
    store: MemoryStore, clock: Clock, make_node: Callable[[str], Node]
) -> None:
    soft = session(store, clock, "soft", affinity="soft", queued=("s-q1", "s-q2"))
    a, b = make_node("a"), make_node("b")
    assert a.tick() is True
    assert store.begin_move(soft, DEAD) is not None  # moving: its s-q1 is parked
    clock.advance(3)  # A's lease (2.5 s) ran out
    assert b.tick() is True and store.holds_lease(LEASE, "b")
    before = clock.now

    a.sweeper.resolve_missing(soft, {"s-q1"}, before)  # fenced
    assert statuses(store, soft) == {"s-q1": TaskStatus.PENDING, "s-q2": TaskStatus.PENDING}
    assert a.resolver.ended == []

    b.sweeper.resolve_missing(soft, {"s-q1"}, before)  # the holder may
    assert statuses(store, soft) == {"s-q1": TaskStatus.PENDING, "s-q2": TaskStatus.LOST}
    assert b.resolver.lost() == {"s-q2"}


def test_two_sweepers_racing_on_one_dead_worker(
    store: MemoryStore, clock: Clock, queues: FakeQueues, make_node: Callable[[str], Node]
) -> None:
    """A moves a session and takes its messages off the dead worker's queue; before A
    parks them, its lease runs out and B sweeps the same worker (where a late message
    of the moved session has just arrived). Neither marks A's parked tasks lost."""
    soft = session(store, clock, "soft", affinity="soft", queued=("s-q1",))
    other = session(store, clock, "other", affinity="hard", heartbeat_timeout=8.0, queued=("o-q1",))
    queues.publish(DEAD_QUEUE, ("s-q1", soft), ("o-q1", other))
    a, b = make_node("a"), make_node("b")
    assert a.tick() is True and b.tick() is False
    clock.advance(5.5)
    send(store, clock, soft, "s-late")  # registered; its message is on its way
    swept_by_b: list[bool] = []

    def b_takes_over() -> None:
        clock.advance(3)  # A is slow: its lease runs out
        queues.publish(DEAD_QUEUE, ("s-late", soft))
        swept_by_b.append(b.tick())

    queues.during_sort = b_takes_over
    clock.advance(0.5)
    assert a.tick() is True  # moves soft, then drains (and B sweeps meanwhile)

    assert swept_by_b == [True]
    assert status(store, other)[0] is SessionStatus.FAILED  # B judged the worker too
    assert status(store, soft) == (SessionStatus.PENDING, Reason.MOVING.value)
    assert sorted(queues.parked(soft)) == ["s-late", "s-q1"]
    assert statuses(store, soft) == {"s-q1": TaskStatus.PENDING, "s-late": TaskStatus.PENDING}
    assert a.resolver.lost() == set() and b.resolver.lost() == set()
    assert a.admissions == [((soft,), {"move": True})] and b.admissions == []


class ReclaimCounting(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reclaims = 0

    def reclaim(self) -> None:
        self.reclaims += 1


def test_a_prune_that_deleted_rows_reclaims_their_space_and_only_then() -> None:
    store = ReclaimCounting()
    assert retention_prune(store, 0, 1000).sessions == 0
    assert store.reclaims == 0  # nothing went: no VACUUM every 30 s on an idle store
    session_id = "s-ended"
    store.create_pending(
        NewSession(id=session_id, created_at=utcnow(), creation_timeout=5, execution_timeout=60)
    )
    store.admit(session_id, "w1@test", "q.w1")
    store.end_session(session_id, SessionStatus.CLOSED, "completed")
    store.settle(session_id)
    assert retention_prune(store, 0, 1000).sessions == 1
    assert store.reclaims == 1


def ended_session(store: MemoryStore, session_id: str, runs: int = 0) -> None:
    store.create_pending(
        NewSession(id=session_id, created_at=utcnow(), creation_timeout=5, execution_timeout=60)
    )
    store.admit(session_id, "w1@test", "q.w1")
    now = utcnow()
    store.record_runs(
        [Run(f"t{i}", 0, session_id, "t", "SUCCESS", "w1@test", now, now) for i in range(runs)]
    )
    store.end_session(session_id, SessionStatus.CLOSED, "completed")
    store.settle(session_id)


@pytest.mark.parametrize("retention", [0.0, None])
def test_whoever_holds_the_lease_applies_retention_a_client_watcher_too(
    retention: float | None,
) -> None:
    """Retention ran only in a worker's ticker, while a client's watcher (a web process)
    renews the lease every monitor_interval and so kept every worker from pruning:
    nothing was ever deleted, and histories grew past history_max_runs."""
    store = MemoryStore()
    ended_session(store, "s-old", runs=5)
    config = Config(
        heartbeat_interval=1.0, monitor_interval=0.5, retention=retention, history_max_runs=2
    )
    client = Sweeper(
        store, cast(Queues, FakeQueues()), cast(Resolver, FakeResolver()), config, print
    )
    assert client.tick() is True  # a client process's watcher: it holds the lease
    if retention is None:
        assert store.get_session("s-old") is not None  # kept, and its history bounded
        assert len(store.history("s-old", None, 1000)) == 2
    else:
        assert store.get_session("s-old") is None
    ended_session(store, "s-next")
    assert client.tick() is True  # not due again for 30 s
    assert store.get_session("s-next") is not None


def test_a_moving_session_its_caller_completes_ends_with_its_parked_tasks(
    store: MemoryStore, clock: Clock, queues: FakeQueues, make_node: Callable[[str], Node]
) -> None:
    """complete() while the session waits for a new worker: it ends closed (no worker
    takes it over later), its parked tasks are dropped and resolved, the run that was
    on the dead worker is lost."""
    soft = session(store, clock, "soft", affinity="soft", queued=("s-q1",), running=("s-r1",))
    queues.publish(DEAD_QUEUE, ("s-q1", soft))
    node = make_node("a")
    node.tick()
    clock.advance(6)
    node.tick()  # the worker is gone: soft moves, its queued task is parked
    assert queues.parked(soft) == ["s-q1"]
    assert node.sweeper.end_move(soft, SessionStatus.CLOSED, "completed") is True
    assert status(store, soft) == (SessionStatus.CLOSED, "completed")
    assert queues.parked(soft) == []
    assert statuses(store, soft) == {"s-q1": TaskStatus.CANCELLED, "s-r1": TaskStatus.LOST}
    assert store.admit(soft, "new@host", "q") is None
    assert node.sweeper.end_move(soft, SessionStatus.CLOSED, "completed") is False

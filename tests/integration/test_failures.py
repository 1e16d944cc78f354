"""Fault injection on real workers: SIGKILL, SIGTERM, restarts, timeouts, recreate.

Every wait is bounded, and every test checks that no task ran after its session
was reported failed or closed (tasks that must not run would leave a file).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from harness import Stack, wait_until
from sessionflow import (
    InvalidRecreateToken,
    SessionClosed,
    SessionCreationTimeout,
    SessionFailed,
    SessionFlow,
    SessionState,
    SessionTaskLost,
    TurnLimitExceeded,
)

pytestmark = pytest.mark.integration
GET = 30
HEARTBEAT_TIMEOUT = 3.0


def task(stack: Stack, name: str) -> Any:
    return stack.app.tasks[f"sfapp.{name}"]


def markers(stack: Stack, prefix: str) -> list[str]:
    return sorted(p.name for p in (stack.root / "data").iterdir() if p.name.startswith(prefix))


def wait_state(session: Any, state: SessionState, timeout: float) -> float:
    """Seconds until the session reaches ``state``; fails after ``timeout``."""
    started = time.monotonic()
    wait_until(lambda: session.info.state is state, timeout, f"session to be {state.value}")
    return time.monotonic() - started


def busy_session(stack: Stack, flow: SessionFlow, prefix: str, **options: Any) -> tuple:
    """A session whose worker runs two long sleeps, with 8 touches queued behind them."""
    sleep, touch = task(stack, "sleep"), task(stack, "touch")
    options.setdefault("heartbeat_timeout", HEARTBEAT_TIMEOUT)
    s = flow.create_session(creation_timeout=30, execution_timeout=600, **options)
    running = [s.apply_async(sleep, args=(60,)) for _ in range(2)]
    wait_until(
        lambda: _states(flow, s, [r.id for r in running]) == {"started"}, 20, "both sleeps to start"
    )
    queued = [s.apply_async(touch, args=(f"{prefix}-{i}",)) for i in range(8)]
    time.sleep(0.5)  # let the worker prefetch some of them
    return s, running, queued


def settle(stack: Stack, queued: list[Any]) -> list[str]:
    """Results of queued tasks after a crash: each ran, or (if the transport lost the
    messages the dead worker had prefetched) resolved as lost. None may hang."""
    ran = []
    for result in queued:
        try:
            ran.append(result.get(timeout=GET))
        except SessionTaskLost:
            assert not REDELIVERS[stack.spec.broker], "a broker that redelivers lost a task"
    return ran


REDELIVERS = {"redis": True, "amqp": True, "filesystem": False}


def _states(flow: SessionFlow, session: Any, task_ids: list[str]) -> set[str]:
    """Statuses the store gives these tasks of ``session``."""
    return {t.status.value for t in flow.store.tasks(session.id) if t.task_id in task_ids}


def test_sigkill_fails_session_and_resolves_every_task(stack: Stack, flow: SessionFlow) -> None:
    prefix = "kill"
    s, running, queued = busy_session(stack, flow, prefix)
    victim = stack.worker_of(s)
    other = next(w for w in stack.workers.values() if w is not victim)
    other.kill()  # nobody but this client is left to notice
    victim.kill()
    took = wait_state(s, SessionState.FAILED, HEARTBEAT_TIMEOUT + 10)
    assert took <= HEARTBEAT_TIMEOUT + 2 + 1.0  # +1: the kill itself and polling
    assert s.info.reason == "worker_lost"
    with pytest.raises(SessionFailed):
        s.apply_async(task(stack, "where"))
    for result in running:
        with pytest.raises(SessionTaskLost):
            result.get(timeout=GET)
    for result in queued:
        with pytest.raises(SessionFailed) as err:
            result.get(timeout=GET)
        assert not isinstance(err.value, SessionTaskLost)
    queue = flow.config.worker_queue(victim.nodename)
    wait_until(lambda: stack.queue_size(queue) == 0, 10, "the dead worker's queue to be drained")
    # The worker comes back under the same name: nothing of the dead session runs.
    stack.start_worker(victim.name)
    stack.start_worker(other.name)
    time.sleep(2)
    assert markers(stack, prefix) == []


def test_sigterm_lets_running_tasks_finish_and_fails_session(
    stack: Stack, flow: SessionFlow
) -> None:
    sleep, touch = task(stack, "sleep"), task(stack, "touch")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    running = [s.apply_async(sleep, args=(3,)) for _ in range(2)]
    wait_until(lambda: _states(flow, s, [r.id for r in running]) == {"started"}, 20, "sleeps")
    queued = [s.apply_async(touch, args=(f"term-{i}",)) for i in range(4)]
    victim = stack.worker_of(s)
    victim.signal(15)
    took = wait_state(s, SessionState.FAILED, 10)
    assert took <= 2.0
    assert s.info.reason == "worker_shutdown"
    assert [r.get(timeout=GET) for r in running] == [3, 3]  # finished as Celery does
    for result in queued:
        with pytest.raises(SessionFailed):
            result.get(timeout=GET)
    victim.popen.wait(30)
    stack.start_worker(victim.name)
    time.sleep(2)
    assert markers(stack, "term-") == []


def test_sigterm_keeps_the_result_of_a_task_registered_after_the_end(
    stack: Stack, flow: SessionFlow
) -> None:
    """A single task's registration is written after its send, in a batch. If the
    session ends (here a warm shutdown) after the task started and before the batch,
    the late registration must not give the running task SessionFailed (it did)."""
    sleep = task(stack, "sleep")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    victim = stack.worker_of(s)
    with flow.registrar._flushing:  # hold this client's registrations back
        late = s.apply_async(sleep, args=(3,))
        wait_until(lambda: _states(flow, s, [late.id]) == {"started"}, 20, "the sleep")
        victim.signal(15)
        wait_state(s, SessionState.FAILED, 10)

        def settled() -> bool:
            found = flow.store.get_session(s.id)
            return found is not None and found.settled

        wait_until(settled, 20, "the worker to settle the session")
    assert s.info.reason == "worker_shutdown"
    assert late.get(timeout=GET) == 3
    victim.popen.wait(30)
    stack.start_worker(victim.name)


def test_a_task_still_running_after_sigterm_is_lost_if_the_worker_is_then_killed(
    stack: Stack, flow: SessionFlow
) -> None:
    """The usual stop sequence (SIGTERM, then SIGKILL after a grace period) with a task
    longer than the grace period, and the worker does not come back: its caller gets
    SessionTaskLost once the worker has been silent for heartbeat_timeout (it waited
    forever: the session was settled at the SIGTERM, nobody judged the run)."""
    sleep = task(stack, "sleep")
    s = flow.create_session(
        creation_timeout=30, execution_timeout=600, heartbeat_timeout=HEARTBEAT_TIMEOUT
    )
    long_ = s.apply_async(sleep, args=(60,))
    wait_until(lambda: _states(flow, s, [long_.id]) == {"started"}, 20, "the sleep")
    victim = stack.worker_of(s)
    victim.signal(15)
    wait_state(s, SessionState.FAILED, 10)
    time.sleep(HEARTBEAT_TIMEOUT + 1)  # finishing: its heartbeats go on, nothing is lost
    assert _states(flow, s, [long_.id]) == {"started"}
    victim.kill()
    started = time.monotonic()
    try:
        with pytest.raises(SessionTaskLost, match="worker_shutdown"):
            long_.get(timeout=HEARTBEAT_TIMEOUT + 15)
        assert time.monotonic() - started <= HEARTBEAT_TIMEOUT + 5
        assert _states(flow, s, [long_.id]) == {"lost"}
    finally:
        stack.start_worker(victim.name)


def test_a_task_finishing_after_sigterm_past_heartbeat_timeout_keeps_its_result(
    stack: Stack, flow: SessionFlow
) -> None:
    sleep = task(stack, "sleep")
    s = flow.create_session(
        creation_timeout=30, execution_timeout=600, heartbeat_timeout=HEARTBEAT_TIMEOUT
    )
    long_ = s.apply_async(sleep, args=(3 * HEARTBEAT_TIMEOUT,))
    wait_until(lambda: _states(flow, s, [long_.id]) == {"started"}, 20, "the sleep")
    victim = stack.worker_of(s)
    victim.signal(15)
    assert long_.get(timeout=GET) == 3 * HEARTBEAT_TIMEOUT
    victim.popen.wait(30)
    assert _states(flow, s, [long_.id]) == {"succeeded"}
    stack.start_worker(victim.name)


def test_survive_restart_keeps_session_and_queued_tasks(stack: Stack, flow: SessionFlow) -> None:
    prefix = "survive"
    s, running, queued = busy_session(
        stack, flow, prefix, survive_restart=True, heartbeat_timeout=20
    )
    victim = stack.worker_of(s)
    hostname = s.info.hostname
    victim.kill()
    stack.start_worker(victim.name)
    for result in running:
        with pytest.raises(SessionTaskLost):
            result.get(timeout=GET)
    ran = settle(stack, queued)
    assert ran == [f"{prefix}-{i}" for i in range(8) if f"{prefix}-{i}" in ran]
    assert s.info.state is SessionState.OPEN and s.info.hostname == hostname
    assert s.apply_async(task(stack, "where"), args=(1,)).get(timeout=GET)["hostname"] == hostname
    assert markers(stack, prefix) == sorted(ran)


def test_survive_restart_fails_when_worker_stays_away(stack: Stack, flow: SessionFlow) -> None:
    s = flow.create_session(
        creation_timeout=30,
        execution_timeout=600,
        survive_restart=True,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
    )
    stack.worker_of(s).kill()
    took = wait_state(s, SessionState.FAILED, HEARTBEAT_TIMEOUT + 10)
    assert took <= HEARTBEAT_TIMEOUT + 3
    assert s.info.reason == "worker_lost"


def test_recreate_session_on_same_worker(stack: Stack, flow: SessionFlow) -> None:
    first = flow.create_session(creation_timeout=30, execution_timeout=600)
    token, hostname = first.info.recreate_token, first.info.hostname
    second = flow.recreate_session(token, creation_timeout=30, execution_timeout=600)
    assert second.info.hostname == hostname and second.id != first.id
    # The worker is full now (cap 2): recreate waits, then times out...
    with pytest.raises(SessionCreationTimeout):
        flow.recreate_session(token, creation_timeout=2, execution_timeout=600)
    # ...and gets the slot that complete() frees.
    waiter: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: waiter.update(
            s=flow.recreate_session(token, creation_timeout=20, execution_timeout=600)
        )
    )
    thread.start()
    time.sleep(0.5)
    first.complete()
    thread.join(30)
    assert waiter["s"].info.hostname == hostname
    for bad in (token[:-2] + "xx", "garbage", token.replace(".", ".a"), 42):
        with pytest.raises(InvalidRecreateToken):
            flow.recreate_session(bad, creation_timeout=1, execution_timeout=10)
    second.complete()
    waiter["s"].complete()


@pytest.mark.parametrize("limit", ["execution_timeout", "ttl", "idle_timeout"])
def test_time_limits_end_sessions_on_time(stack: Stack, flow: SessionFlow, limit: str) -> None:
    where, touch, sleep = task(stack, "where"), task(stack, "touch"), task(stack, "sleep")
    options = {"execution_timeout": 600.0}
    options[limit] = 4.0
    s = flow.create_session(creation_timeout=30, **options)
    opened = time.monotonic()
    if limit == "idle_timeout":
        time.sleep(2)
        s.apply_async(where, args=(1,)).get(timeout=GET)  # activity restarts the idle clock
        opened = time.monotonic()
    else:
        # Busy well past the limit (+4 s), so the end is applied before a slot frees for
        # `waiting` even when the machine is slow to close the session (up to +2.5 s).
        blockers = [s.apply_async(sleep, args=(8,)) for _ in range(2)]
        waiting = s.apply_async(touch, args=(f"limit-{limit}",))
    wait_state(s, SessionState.CLOSED, 15)
    took = time.monotonic() - opened
    assert 4.0 - 0.5 <= took <= 4.0 + 2.5, took
    assert s.info.reason == limit
    if limit != "idle_timeout":
        with pytest.raises(SessionClosed):
            waiting.get(timeout=GET)
        assert [b.get(timeout=GET) for b in blockers] == [8, 8]
        assert markers(stack, f"limit-{limit}") == []
    # The slot is free again: both workers admit two sessions each.
    more = [flow.create_session(creation_timeout=10, execution_timeout=60) for _ in range(4)]
    for m in more:
        m.complete()


def test_max_turns(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    with flow.create_session(creation_timeout=30, execution_timeout=600, max_turns=3) as s:
        s.apply_async(where, args=(1,)).get(timeout=GET)
        with pytest.raises(TurnLimitExceeded):
            s.apply_async(where.chunks([(i,) for i in range(3)], 1).group())
        s.apply_async(where, args=(2,)).get(timeout=GET)
        s.apply_async(where, args=(3,)).get(timeout=GET)
        with pytest.raises(TurnLimitExceeded):
            s.apply_async(where, args=(4,))
        assert s.info.turns == 3


def test_sigkill_during_admission(stack: Stack, flow: SessionFlow) -> None:
    outcomes: list[Any] = []

    def create() -> None:
        try:
            outcomes.append(
                flow.create_session(
                    creation_timeout=6, execution_timeout=600, heartbeat_timeout=HEARTBEAT_TIMEOUT
                )
            )
        except SessionCreationTimeout as exc:
            outcomes.append(exc)

    victim = stack.workers["w1"]
    threads = [threading.Thread(target=create) for _ in range(6)]
    for i, thread in enumerate(threads):
        thread.start()
        if i == 2:
            victim.kill()
    for thread in threads:
        thread.join(20)
    assert len(outcomes) == 6 and not any(t.is_alive() for t in threads)
    sessions = [o for o in outcomes if not isinstance(o, Exception)]
    time.sleep(HEARTBEAT_TIMEOUT + 2)
    for s in sessions:
        info = s.info
        if info.hostname == victim.nodename:
            assert info.state is SessionState.FAILED and info.reason == "worker_lost"
        else:
            assert info.state is SessionState.OPEN
    assert flow.list_sessions(state="open", hostname=victim.nodename) == []
    assert len(flow.list_sessions(state="open")) <= 2


def test_soft_affinity_moves_session_with_its_queued_tasks(stack: Stack, flow: SessionFlow) -> None:
    prefix = "soft"
    s, running, queued = busy_session(
        stack, flow, prefix, affinity="soft", metadata={"kept": True}, user_id="mover"
    )
    victim = stack.worker_of(s)
    survivor = next(w for w in stack.workers.values() if w is not victim)
    victim.kill()
    wait_until(
        lambda: s.info.hostname == survivor.nodename,
        HEARTBEAT_TIMEOUT + 10,
        "the session to move to the other worker",
    )
    info = s.info
    assert (info.state, info.metadata, info.user_id) == (SessionState.OPEN, {"kept": True}, "mover")
    for result in running:
        with pytest.raises(SessionTaskLost):
            result.get(timeout=GET)
    ran = settle(stack, queued)
    assert markers(stack, prefix) == sorted(ran)
    written_by = {(stack.root / "data" / name).read_text() for name in markers(stack, prefix)}
    assert written_by == {survivor.nodename}
    after = s.apply_async(task(stack, "where"), args=(1,)).get(timeout=GET)
    assert after["hostname"] == survivor.nodename and after["session"] == s.id


def test_sigkill_between_a_task_end_and_the_flush(stack: Stack, flow: SessionFlow) -> None:
    """The window group commit opens, named in the README: a worker killed after a task
    ended but before its writer flushed. The caller still gets the task's own result (it
    is in the result backend and never overwritten); the run is missing from the history;
    the session itself fails as for any killed worker (``list_sessions`` is exact)."""
    where = task(stack, "where")
    for name in ("w1", "w2"):
        stack.workers[name].kill()  # restarted by the flow fixture afterwards
    slow = stack.spawn_worker("w3", log_name="w3-slow-flush", env={"SF_FLUSH_INTERVAL": "60"})
    stack.workers["w3"] = slow
    stack.wait_ready(slow)
    try:
        s = flow.create_session(
            creation_timeout=30, execution_timeout=600, heartbeat_timeout=HEARTBEAT_TIMEOUT
        )
        assert s.info.hostname == slow.nodename
        done = s.apply_async(where, args=("before the kill",))
        assert done.get(timeout=GET)["session"] == s.id
        slow.kill()  # within the minute the writer waits before its next flush
        wait_state(s, SessionState.FAILED, HEARTBEAT_TIMEOUT + 10)
        assert s.info.reason == "worker_lost"
        assert done.get(timeout=GET)["args"] == ["before the kill"]  # never SessionFailed
        assert s.history() == []  # the run had not been written
        assert s in flow.list_sessions(state="failed")
    finally:
        slow.kill()
        del stack.workers["w3"]


def test_survive_restart_with_an_empty_queue(stack: Stack, flow: SessionFlow) -> None:
    """Nothing queued when the worker died: on Redis its session queue does not exist
    then, and the restarted worker must not crash sorting it."""
    s = flow.create_session(
        creation_timeout=30, execution_timeout=600, survive_restart=True, heartbeat_timeout=20
    )
    where = task(stack, "where")
    hostname = s.apply_async(where, args=(1,)).get(timeout=GET)["hostname"]
    victim = stack.worker_of(s)
    victim.kill()
    stack.start_worker(victim.name)  # waits for "ready.": a crash at start fails here
    assert s.info.state is SessionState.OPEN
    assert s.apply_async(where, args=(2,)).get(timeout=GET)["hostname"] == hostname

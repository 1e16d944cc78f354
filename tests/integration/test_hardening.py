"""Misuse on real workers: forged headers, a taken node name, tasks sent from tasks,
requests nobody waits for, and secrets that must never show."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
import time
from typing import Any

import pytest
from celery import signals

from harness import DB_PASSWORD, HERE, SECRET_KEY, Stack, wait_until
from sessionflow import (
    SessionClosed,
    SessionCreationTimeout,
    SessionFlow,
    SessionState,
    SessionTaskRefused,
    StoreError,
)
from sessionflow.canvas import QUEUE_HEADER, SESSION_HEADER, SIG_HEADER

pytestmark = pytest.mark.integration
GET = 30


def task(stack: Stack, name: str) -> Any:
    return stack.app.tasks[f"sfapp.{name}"]


# -- forged messages ---------------------------------------------------------------------


def test_forged_session_headers_are_refused(stack: Stack, flow: SessionFlow) -> None:
    set_, where = task(stack, "state_set"), task(stack, "where")
    s = flow.create_session(creation_timeout=30, execution_timeout=600, max_turns=1)
    holder = stack.worker_of(s)
    other = next(w for w in stack.workers.values() if w is not holder)
    sent: dict[str, dict[str, Any]] = {}

    def remember(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers:
            sent[headers["id"]] = dict(headers)

    signals.before_task_publish.connect(remember, weak=False)
    try:
        genuine = s.apply_async(where, args=("genuine",))
    finally:
        signals.before_task_publish.disconnect(remember)
    assert genuine.get(timeout=GET)["session"] == s.id
    stolen_sig = sent[genuine.id][SIG_HEADER]
    forged_headers = [
        # another worker's queue: the worker does not hold the session
        {SESSION_HEADER: s.id, QUEUE_HEADER: flow.config.worker_queue(other.nodename)},
        # the right worker, no signature
        {SESSION_HEADER: s.id, QUEUE_HEADER: s.info.queue},
        # the right worker, a genuine signature of another task
        {SESSION_HEADER: s.id, QUEUE_HEADER: s.info.queue, SIG_HEADER: stolen_sig},
        {SESSION_HEADER: s.id, QUEUE_HEADER: s.info.queue, SIG_HEADER: "0" * 32},
        {
            SESSION_HEADER: s.id,
            QUEUE_HEADER: flow.config.worker_queue(other.nodename),
            SIG_HEADER: stolen_sig,
        },
    ]
    for headers in forged_headers:
        result = set_.apply_async(args=("forged", True), headers=headers)
        with pytest.raises(SessionTaskRefused) as err:
            result.get(timeout=GET)
        assert err.value.session_id == s.id
    info = s.info
    assert "forged" not in s.state  # the session's state was never touched
    assert (info.turns, info.state) == (1, SessionState.OPEN)  # forged runs cost no turn
    # Runs reach the history in the worker's next flush (sessionflow_flush_interval).
    wait_until(lambda: s.history(), 10, "the genuine run in the history")
    time.sleep(0.3)
    assert [r.task_id for r in s.history()] == [genuine.id]
    s.complete()


# -- a node name held by a live worker ----------------------------------------------------


def test_second_worker_with_a_taken_node_name_refuses_to_start(
    stack: Stack, flow: SessionFlow
) -> None:
    where = task(stack, "where")
    s = flow.create_session(creation_timeout=30, execution_timeout=600)
    holder = stack.worker_of(s)
    duplicate = stack.spawn_worker(holder.name, log_name=f"{holder.name}-duplicate")
    try:
        wait_until(lambda: not duplicate.alive(), 90, "the duplicate worker to give up")
    finally:
        duplicate.kill()
    log = duplicate.log()
    assert duplicate.popen.returncode != 0
    assert f"a worker named {holder.nodename} is already running (pid {holder.popen.pid}" in log
    assert "-n" in log
    # The live worker lost nothing: its session stays open and its tasks run there.
    time.sleep(1.5)
    assert s.info.state is SessionState.OPEN and s.info.hostname == holder.nodename
    assert s.apply_async(where, args=(1,)).get(timeout=GET)["pid"] != duplicate.popen.pid
    assert holder.alive()
    s.complete()


# -- tasks sent from inside a session task ---------------------------------------------------


@pytest.mark.parametrize("how", ["delay", "send_task", "chain"])
def test_tasks_sent_from_a_session_task_join_it(stack: Stack, flow: SessionFlow, how: str) -> None:
    spawn = task(stack, "spawn_plain")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        turns = s.info.turns
        child_ids = s.apply_async(spawn, args=("child", how)).get(timeout=GET)
        children = [stack.app.AsyncResult(i).get(timeout=GET) for i in child_ids]
        assert {c["session"] for c in children} == {s.id}
        assert {c["hostname"] for c in children} == {s.info.hostname}
        expected = turns + 1 + (1 if how != "chain" else 2)  # single sends register in a batch
        wait_until(lambda: s.info.turns == expected, 10, f"{expected} turns")


def test_detached_tasks_leave_the_session(stack: Stack, flow: SessionFlow) -> None:
    spawn = task(stack, "spawn_plain")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        [child_id] = s.apply_async(spawn, args=("away", "detached")).get(timeout=GET)
        assert stack.app.AsyncResult(child_id).get(timeout=GET)["session"] is None
        wait_until(lambda: s.info.turns == 1, 10, "the spawning task's turn")
        time.sleep(0.5)
        assert s.info.turns == 1  # the detached child took none


def test_session_delay_and_send_task(stack: Stack, flow: SessionFlow) -> None:
    where = task(stack, "where")
    with flow.create_session(creation_timeout=30, execution_timeout=600) as s:
        by_delay = s.delay(where, "a", "b").get(timeout=GET)
        by_name = s.send_task("sfapp.where", args=("c",)).get(timeout=GET)
        assert by_delay["args"] == ["a", "b"] and by_name["args"] == ["c"]
        assert {by_delay["session"], by_name["session"]} == {s.id}


# -- creation requests nobody waits for ------------------------------------------------------


def test_timed_out_creation_requests_do_not_pile_up(stack: Stack, flow: SessionFlow) -> None:
    full = [flow.create_session(creation_timeout=30, execution_timeout=600) for _ in range(4)]
    try:
        for _ in range(100):
            with pytest.raises(SessionCreationTimeout):
                flow.create_session(creation_timeout=0.05, execution_timeout=60)
        assert stack.queue_size(flow.config.creation_queue) == 0
    finally:
        for s in full:
            s.complete()
    time.sleep(1.0)  # a worker with room again must not open any of the hundred
    assert flow.list_sessions(state="open") == []
    with flow.create_session(creation_timeout=30, execution_timeout=60) as fresh:
        assert fresh.info.state is SessionState.OPEN


# -- secrets ---------------------------------------------------------------------------------


def test_no_secret_in_reprs_pickles_errors_or_cli(stack: Stack, flow: SessionFlow) -> None:
    outputs: list[str] = []
    with flow.create_session(creation_timeout=30, execution_timeout=60) as s:
        info = s.info
        assert info.recreate_token
        outputs += [repr(info), repr(dataclasses.asdict(info)), str(pickle.dumps(info))]
    outputs += [repr(flow.config), repr(flow.store), repr(flow), repr(s)]
    bad_url = f"postgresql+psycopg://someone:{DB_PASSWORD}@127.0.0.1:1/nothing"
    from sessionflow.config import Config
    from sessionflow.store.sql import SQLStore

    with pytest.raises(StoreError) as err:
        SQLStore(Config(database_url=bad_url)).get_session("x")
    outputs.append(str(err.value))
    env = stack.worker_env()
    for args in (
        ["db", "upgrade", "--url", bad_url],
        ["db", "current", "--url", bad_url],
        ["db", "current", "-A", "sfapp"],
        ["sessions", "-A", "sfapp"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "sessionflow.cli", *args],
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        outputs.append(done.stdout + done.stderr)
    assert "***" in outputs[-3] or "revision" in outputs[-2]
    for text in outputs:
        assert SECRET_KEY not in text and DB_PASSWORD not in text, text[:500]


def test_solo_pool_runs_session_tasks_through_the_gate(stack: Stack, flow: SessionFlow) -> None:
    """Celery rebuilds tracers when its consumer starts: the gate must wrap them again,
    or a solo/threads worker would run session tasks without claiming their start."""
    where, sleep, touch = task(stack, "where"), task(stack, "sleep"), task(stack, "touch")
    for name in ("w1", "w2"):
        stack.workers[name].kill()  # restarted by the flow fixture afterwards
    solo = stack.spawn_worker("w3", log_name="w3-solo", extra=("-P", "solo"))
    stack.workers["w3"] = solo
    stack.wait_ready(solo)
    try:
        s = flow.create_session(creation_timeout=30, execution_timeout=600)
        assert s.apply_async(where, args=(1,)).get(timeout=GET)["session"] == s.id
        # The solo worker's event loop is blocked while busy runs: complete() gets no reply
        # within its 1 s and returns once the worker's ticker thread has applied the end.
        # busy must outlast that by far, or the end would be a reply after busy, racing
        # late's arrival (both legitimate; only the first is what this test is about).
        busy = s.apply_async(sleep, args=(4.0,))
        late = s.apply_async(touch, args=("solo-late",))
        time.sleep(0.3)
        s.complete()
        assert not busy.ready()  # complete() returned while busy still ran
        assert busy.get(timeout=GET) == 4.0
        with pytest.raises(SessionClosed):
            late.get(timeout=GET)
        assert not (stack.root / "data" / "solo-late").exists()
    finally:
        solo.kill()
        del stack.workers["w3"]

"""Placement on real workers: capacities, labels, constraints, preferences, waiting, limits.

Each test starts its own workers (``--session-resources``, ``--session-labels``) next
to the stack's w1 and w2, which declare neither, and stops them at the end.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import HOSTNAME, Stack, WorkerProcess, wait_until
from sessionflow import (
    SessionCreationTimeout,
    SessionFlow,
    SessionState,
    SessionUnplaceable,
)
from sessionflow.ops import ask_workers
from sessionflow.ops import workers as ops_workers

pytestmark = pytest.mark.integration
GET = 30
HEARTBEAT_TIMEOUT = 3.0


class Extra:
    """Workers a test starts with placement options; all stopped when it ends."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.names: set[str] = set()

    def start(
        self,
        name: str,
        *,
        max_sessions: int = 4,
        resources: str | None = None,
        labels: str | None = None,
        limits: str | None = None,
        concurrency: int = 2,
        wait: bool = True,
    ) -> WorkerProcess:
        extra: list[str] = []
        for flag, value in (
            ("--session-resources", resources),
            ("--session-labels", labels),
            ("--session-task-limits", limits),
        ):
            if value is not None:
                extra += [flag, value]
        self.names.add(name)
        return self.stack.start_worker(
            name,
            max_sessions=max_sessions,
            concurrency=concurrency,
            extra=tuple(extra),
            wait=wait,
        )

    def stop(self) -> None:
        for name in sorted(self.names):
            worker = self.stack.workers.pop(name, None)
            if worker is not None:
                worker.stop()
        if self.stack.spec.broker == "amqp":  # RabbitMQ keeps queues; the others do not
            config = self.stack.flow.config
            with self.stack.app.connection_for_write() as conn:
                for name in self.names:
                    node = f"{name}@{HOSTNAME}"
                    for queue in (config.worker_queue(node), config.worker_creation_queue(node)):
                        conn.default_channel.queue_delete(queue)


@pytest.fixture
def extra(stack: Stack) -> Iterator[Extra]:
    workers = Extra(stack)
    try:
        yield workers
    finally:
        workers.stop()


def where(stack: Stack, session: Any) -> str:
    """The worker a task of ``session`` ran on."""
    task = stack.app.tasks["sfapp.where"]
    return str(session.apply_async(task, args=(1,)).get(timeout=GET)["hostname"])


def test_requires_constraints_and_preferences_choose_the_worker(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    gpu = extra.start("g1", resources="gpu=2", labels="zone=eu,vram_gb=24", wait=False)
    cpu = extra.start("c1", resources="browser=8", labels="zone=us")
    stack.wait_ready(gpu)
    options = {"creation_timeout": 30, "execution_timeout": 600}
    on_gpu = flow.create_session(requires={"gpu": 1}, **options)
    in_us = flow.create_session(constraints={"zone": "us"}, **options)
    browsers = flow.create_session(
        requires={"browser": 2}, constraints={"zone": ("in", ["us", "ap"])}, **options
    )
    big = flow.create_session(constraints={"vram_gb": (">=", 16)}, **options)
    liked = flow.create_session(prefer=[(10, {"zone": "us"})], placement="pack", **options)
    assert on_gpu.info.hostname == big.info.hostname == gpu.nodename
    # What each asked for is part of its info and of `celery sessions show`.
    assert (on_gpu.info.requires, on_gpu.info.constraints) == ({"gpu": 1}, {})
    assert big.info.constraints == {"vram_gb": [">=", 16]} and big.info.requires == {}
    assert (liked.info.prefer, liked.info.placement) == ([[10, {"zone": ["==", "us"]}]], "pack")
    assert in_us.info.hostname == browsers.info.hostname == liked.info.hostname == cpu.nodename
    assert where(stack, on_gpu) == gpu.nodename and where(stack, browsers) == cpu.nodename
    # The store has what each worker offers and what its open sessions hold.
    rows = {w.nodename: w for w in flow.store.workers()}
    assert (rows[gpu.nodename].resources, rows[gpu.nodename].labels) == (
        {"gpu": 2},
        {"zone": "eu", "vram_gb": "24"},
    )
    assert rows[gpu.nodename].usage == {"gpu": 1}
    assert rows[cpu.nodename].usage == {"browser": 2}
    # ... and so do `celery sessions workers` (store and live) and `inspect sessions`.
    seen = {w["nodename"]: w for w in ops_workers(flow, timeout=3)["workers"]}
    assert seen[gpu.nodename]["store"]["used"] == {"gpu": 1}
    assert seen[gpu.nodename]["live"]["resources"] == {"gpu": 2}
    assert seen[cpu.nodename]["live"]["used"] == {"browser": 2}
    assert seen[cpu.nodename]["live"]["labels"] == {"zone": "us"}
    held = seen[cpu.nodename]["live"]["sessions"][browsers.id]
    assert held["requires"] == {"browser": 2}
    for session in (on_gpu, in_us, browsers, big, liked):
        session.complete()
    assert {w.nodename: w.usage for w in flow.store.workers()}[gpu.nodename] == {}


def test_unplaceable_fails_at_once_naming_what_is_missing(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    gpu = extra.start("g1", resources="gpu=2", labels="zone=eu")
    before = len(flow.list_sessions())
    started = time.monotonic()
    with pytest.raises(SessionUnplaceable) as err:
        flow.create_session(creation_timeout=60, execution_timeout=60, requires={"gpu": 4})
    assert time.monotonic() - started < 2  # not after creation_timeout
    text = str(err.value)
    assert text.startswith("no live worker has gpu >= 4; live workers: ")
    assert f"{gpu.nodename} (gpu=2)" in text and f"{stack.workers['w1'].nodename} (gpu=0)" in text
    with pytest.raises(SessionUnplaceable, match=r"gpu >= 1 with zone=us; .*zone=eu"):
        flow.create_session(
            creation_timeout=60,
            execution_timeout=60,
            requires={"gpu": 1},
            constraints={"zone": "us"},
        )
    assert len(flow.list_sessions()) == before  # nothing was written, nothing waits
    # The non-blocking request says the same when waited on (not a bare "failed").
    ask = flow.request_session(creation_timeout=60, execution_timeout=60, requires={"gpu": 4})
    with pytest.raises(SessionUnplaceable, match=r"^no live worker has gpu >= 4; "):
        ask.wait(timeout=30)


def test_busy_waits_for_a_slot_or_a_joining_worker_then_times_out(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    first = extra.start("g1", resources="gpu=1")
    holder = flow.create_session(creation_timeout=30, execution_timeout=600, requires={"gpu": 1})
    started = time.monotonic()
    with pytest.raises(SessionCreationTimeout) as err:
        flow.create_session(creation_timeout=1.5, execution_timeout=60, requires={"gpu": 1})
    assert 1.4 <= time.monotonic() - started < 6
    assert f"{first.nodename} short of gpu (1 of 1 in use, wants 1)" in str(err.value)

    def wait_for_gpu(out: list[Any]) -> None:
        try:
            out.append(
                flow.create_session(creation_timeout=60, execution_timeout=600, requires={"gpu": 1})
            )
        except Exception as exc:
            out.append(exc)

    freed: list[Any] = []
    waiter = threading.Thread(target=wait_for_gpu, args=(freed,))
    waiter.start()
    time.sleep(1.0)
    assert freed == []  # still waiting: the only gpu is held
    holder.complete()
    waiter.join(15)
    assert len(freed) == 1 and not isinstance(freed[0], Exception), freed
    assert freed[0].info.hostname == first.nodename

    joined: list[Any] = []
    waiter = threading.Thread(target=wait_for_gpu, args=(joined,))
    waiter.start()
    time.sleep(1.0)
    assert joined == []
    second = extra.start("g2", resources="gpu=1")  # joins while the request waits
    waiter.join(30)
    assert len(joined) == 1 and not isinstance(joined[0], Exception), joined
    assert joined[0].info.hostname == second.nodename


CREATOR = """
import json, random, sys, threading, time
from sessionflow import SessionFlow
flow = SessionFlow(app)
MIX = [
    {"requires": {"gpu": 1}},
    {"requires": {"cpu": 2}},
    {"requires": {"gpu": 1, "cpu": 1}, "constraints": {"zone": "eu"}},
    {"requires": {"cpu": 1}, "constraints": {"zone": "us"}},
    {"requires": {"cpu": 1}, "prefer": {"model": "llama3"}, "placement": "pack"},
    {"constraints": {"zone": ["in", ["eu", "us"]]}},
    {"requires": {"gpu": 2, "cpu": 4}},
]
out, lock = [], threading.Lock()
def creator(seed):
    rnd = random.Random(seed)
    for _ in range(ROUNDS):
        ask = rnd.choice(MIX)
        s = flow.create_session(creation_timeout=90, execution_timeout=600, **ask)
        ran = s.apply_async(app.tasks["sfapp.where"], args=(1,)).get(timeout=60)["hostname"]
        time.sleep(rnd.uniform(0.02, 0.25))
        host = s.info.hostname
        s.complete()
        with lock:
            out.append({"ask": ask, "hostname": host, "ran": ran})
threads = [threading.Thread(target=creator, args=(BASE + i,)) for i in range(THREADS)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


def test_concurrent_creators_never_take_a_worker_over_any_capacity(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    """20 creators (2 processes x 10 threads), mixed requests, 3 workers of different
    shapes: a watcher reads every worker's usage from the store as fast as it can."""
    spec = {
        "p1": ("gpu=2,cpu=4", "zone=eu", 3),
        "p2": ("cpu=8", "zone=us", 4),
        "p3": ("gpu=1,cpu=2", "zone=eu,model=llama3", 2),
    }
    procs = [
        extra.start(n, resources=r, labels=lb, max_sessions=m, wait=False)
        for n, (r, lb, m) in spec.items()
    ]
    for worker in procs:
        stack.wait_ready(worker)
    names = {w.nodename for w in procs}
    violations: list[str] = []
    samples = [0]
    peak: dict[str, dict[str, int]] = {n: {} for n in names}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for w in flow.store.workers():
                if w.nodename not in names:
                    continue
                usage = {**w.usage, "sessions": w.open_sessions}
                capacity = {**w.resources, "sessions": w.max_sessions}
                for resource, amount in usage.items():
                    peak[w.nodename][resource] = max(peak[w.nodename].get(resource, 0), amount)
                    if amount > capacity.get(resource, 0):
                        violations.append(f"{w.nodename}: {resource} {amount} > {capacity}")
            samples[0] += 1

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    prelude = "import os\nfrom sfapp import create_app\napp = create_app(os.environ)\n"
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", prelude + f"ROUNDS, THREADS, BASE = 4, 10, {base}\n" + CREATOR],
            cwd=stack.root,
            env=stack.worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for base in (0, 100)
    ]
    try:
        outputs = [c.communicate(timeout=240) for c in clients]
    finally:
        stop.set()
        watcher.join(10)
        for c in clients:
            c.kill()
    for client, (_, stderr) in zip(clients, outputs, strict=True):
        assert client.returncode == 0, stderr[-3000:]
    made = [item for stdout, _ in outputs for item in json.loads(stdout)]
    # A creator thread that raised is missing from ``made``; its traceback is in stderr.
    assert len(made) == 80, "\n".join(stderr[-3000:] for _, stderr in outputs)
    assert violations == [] and samples[0] > 50, (violations[:5], samples[0])
    labels = {procs[i].nodename: spec[n][1] for i, n in enumerate(spec)}
    for item in made:
        assert item["hostname"] == item["ran"] and item["hostname"] in names, item
        constraint = item["ask"].get("constraints", {}).get("zone")
        zone = dict(p.split("=") for p in labels[item["hostname"]].split(","))["zone"]
        if isinstance(constraint, str):
            assert zone == constraint, item
    # The mix filled the capacities it could: the contention was real.
    assert peak[procs[0].nodename].get("gpu") == 2 and peak[procs[1].nodename].get("cpu", 0) >= 4
    assert all(w.usage == {} for w in flow.store.workers() if w.nodename in names)


def test_runtime_changes_keep_open_reservations(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    gpu = extra.start("g1", resources="gpu=1", labels="zone=eu")
    held = flow.create_session(creation_timeout=30, execution_timeout=600, requires={"gpu": 1})
    done = subprocess.run(
        [
            *(sys.executable, "-m", "celery", "-A", "sfapp", "control", "sessions_resources"),
            *("gpu=3,browser=2", "-d", gpu.nodename),
        ],
        cwd=stack.root,
        env=stack.worker_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "resources gpu=1 -> browser=2,gpu=3 (in use: gpu=1)" in done.stdout
    wait_until(
        lambda: (
            {w.nodename: w.resources for w in flow.store.workers()}[gpu.nodename]
            == {"gpu": 3, "browser": 2}
        ),
        5,
        "the new capacities in the store",
    )
    more = [
        flow.create_session(creation_timeout=30, execution_timeout=600, requires={"gpu": 1})
        for _ in range(2)
    ]
    assert {s.info.hostname for s in more} == {gpu.nodename}
    assert held.info.state is SessionState.OPEN  # kept its reservation throughout
    with pytest.raises(SessionCreationTimeout, match=r"gpu .3 of 3 in use"):
        flow.create_session(creation_timeout=1, execution_timeout=60, requires={"gpu": 1})
    # Labels: the next admission sees them; a lowered capacity ends no session.
    replies = flow.app.control.broadcast(
        "sessions_labels",
        arguments={"labels": "zone=us"},
        destination=[gpu.nodename],
        reply=True,
        timeout=5,
    )
    assert replies and "zone=eu -> zone=us" in replies[0][gpu.nodename]["ok"]
    flow.app.control.broadcast(
        "sessions_resources", arguments={"resources": "gpu=0"}, destination=[gpu.nodename]
    )
    wait_until(
        lambda: (
            {w.nodename: w.labels for w in flow.store.workers()}[gpu.nodename] == {"zone": "us"}
        ),
        5,
        "the new labels in the store",
    )
    assert all(s.info.state is SessionState.OPEN for s in [held, *more])
    with pytest.raises(SessionUnplaceable, match="no live worker has gpu >= 1"):
        flow.create_session(creation_timeout=30, execution_timeout=60, requires={"gpu": 1})
    moved = flow.create_session(
        creation_timeout=30, execution_timeout=60, constraints={"zone": "us"}
    )
    assert moved.info.hostname == gpu.nodename


def test_recreate_keeps_the_constraints(stack: Stack, flow: SessionFlow, extra: Extra) -> None:
    gpu = extra.start("g1", resources="gpu=1", labels="zone=eu")
    old = flow.create_session(
        creation_timeout=30, execution_timeout=600, requires={"gpu": 1}, constraints={"zone": "eu"}
    )
    token = old.info.recreate_token
    with pytest.raises(SessionCreationTimeout, match="gpu"):  # the old one still holds it
        flow.recreate_session(token, creation_timeout=1, execution_timeout=60)
    old.complete()
    again = flow.recreate_session(token, creation_timeout=30, execution_timeout=60)
    assert again.info.hostname == gpu.nodename
    record = flow.store.get_session(again.id)
    assert record is not None and record.requires == {"gpu": 1}
    assert record.constraints == {"zone": ["==", "eu"]}
    again.complete()
    flow.app.control.broadcast(
        "sessions_labels", arguments={"labels": "zone=us"}, destination=[gpu.nodename]
    )
    wait_until(
        lambda: (
            {w.nodename: w.labels for w in flow.store.workers()}[gpu.nodename] == {"zone": "us"}
        ),
        5,
        "the new labels in the store",
    )
    with pytest.raises(SessionUnplaceable, match="zone=eu"):
        flow.recreate_session(token, creation_timeout=30, execution_timeout=60)
    loose = flow.recreate_session(token, creation_timeout=30, execution_timeout=60, constraints={})
    assert loose.info.hostname == gpu.nodename


def test_task_limits_run_one_render_at_a_time_across_sessions(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    worker = extra.start("r1", labels="role=render", limits="sfapp.render=1", concurrency=4)
    render, where_ = stack.app.tasks["sfapp.render"], stack.app.tasks["sfapp.where"]
    sessions = [
        flow.create_session(
            creation_timeout=30, execution_timeout=600, constraints={"role": "render"}
        )
        for _ in range(2)
    ]
    results = [s.apply_async(render, args=(0.4,)) for _ in range(3) for s in sessions]
    time.sleep(0.3)
    quick = sessions[0].apply_async(where_, args=(1,)).get(timeout=GET)  # not held back
    assert quick["hostname"] == worker.nodename
    assert not all(r.ready() for r in results)
    view = ask_workers(flow.app, timeout=5, destination=[worker.nodename])
    limits = view[worker.nodename]["task_limits"]["sfapp.render"]
    assert limits["limit"] == 1 and limits["running"] == 1 and limits["waiting"] >= 1
    runs = sorted((r.get(timeout=GET) for r in results), key=lambda run: run["started"])
    assert {run["hostname"] for run in runs} == {worker.nodename}
    for before, after in itertools.pairwise(runs):
        assert after["started"] >= before["finished"] - 0.01, runs  # never two at once


def test_a_soft_move_keeps_the_requires_and_constraints(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    """Hatchet #4936's lesson: a session that changes workers is placed by the same rules.
    c1 has the GPUs but the wrong zone, w1 and w2 neither: the session moves only to the
    other EU GPU worker, and fails once that one is gone too."""
    workers = [
        extra.start(name, resources=r, labels=lb, wait=False)
        for name, r, lb in (("g1", "gpu=1", "zone=eu"), ("g2", "gpu=1", "zone=eu"))
    ]
    extra.start("c1", resources="gpu=4", labels="zone=us")
    for worker in workers:
        stack.wait_ready(worker)
    s = flow.create_session(
        creation_timeout=30,
        execution_timeout=600,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        affinity="soft",
        requires={"gpu": 1},
        constraints={"zone": "eu"},
    )
    victim = next(w for w in workers if w.nodename == s.info.hostname)
    other = next(w for w in workers if w is not victim)
    victim.kill()
    wait_until(
        lambda: s.info.hostname == other.nodename and s.info.state is SessionState.OPEN,
        HEARTBEAT_TIMEOUT + 20,
        "the session to move to the other EU GPU worker",
    )
    assert where(stack, s) == other.nodename
    other.kill()
    wait_until(
        lambda: s.info.state is SessionState.FAILED,
        HEARTBEAT_TIMEOUT + 20,
        "the session to fail: no live worker fits",
    )
    assert s.info.reason == "worker_lost"
    assert [w.nodename for w in flow.store.workers() if w.usage] == []  # c1 took nothing


def test_a_worker_back_with_less_fails_what_no_longer_fits(
    stack: Stack, flow: SessionFlow, extra: Extra
) -> None:
    """Restart survival re-judges the surviving sessions against what the worker offers
    now, in the order they opened: never over a capacity."""
    gpu = extra.start("g1", resources="gpu=2")
    kept, dropped = (
        flow.create_session(
            creation_timeout=30,
            execution_timeout=600,
            survive_restart=True,
            heartbeat_timeout=30,
            requires={"gpu": 1},
        )
        for _ in range(2)
    )
    gpu.kill()
    extra.start("g1", resources="gpu=1")  # the same node name, one GPU fewer
    wait_until(lambda: dropped.info.state is SessionState.FAILED, 30, "the second session to fail")
    assert dropped.info.reason == "worker_changed"
    assert kept.info.state is SessionState.OPEN and where(stack, kept) == gpu.nodename
    usage = {w.nodename: w.usage for w in flow.store.workers()}
    assert usage[gpu.nodename] == {"gpu": 1}

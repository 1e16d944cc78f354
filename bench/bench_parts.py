"""What each part of a session task costs, each measured in a loop of its own.

    .venv/bin/python bench/bench_parts.py [--stores sqlite,postgres] [-n 20000]

``bench_sessions.py`` measures the whole: on a 2-core box its ratios move by ±0.1 from
run to run, far more than any one change to the hot path. This script measures the
parts without a broker, a worker or load, so a change of a few microseconds shows:

- **worker event loop**: a request through the gate (signature check, live view) and
  the pool callbacks (start, end: the run record for the writer, removing the claim),
  as a prefork pool calls them; plain requests through the same wrappers;
- **pool process**: the tracer around a task that does nothing (claiming the start in a
  real live directory, the middleware);
- **client**: ``session.apply_async(task)`` against ``task.apply_async()``, the same
  app, with publishing replaced by a no-op (so only the Python that differs is timed);
- **rows**: the batched registration the client's registrar writes and the batched run
  the worker's writer writes, per task, on each store: CPU of this process and, for
  PostgreSQL on this machine, of its server processes.

Under load the same code costs 1.5-3 times as much (cold caches, two cores shared by
client, worker and servers); compare runs of this script with each other, not with
``bench_sessions.py``. Exit status 0: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

from _common import (
    PG_ADMIN_URL,
    PG_HOST,
    PG_PORT,
    environment_line,
    open_session,
    service_up,
    services_cpu,
)
from celery import Celery

from sessionflow import SessionFlow, tokens
from sessionflow.branches import BranchMiddleware
from sessionflow.canvas import QUEUE_HEADER, SESSION_HEADER, SIG_HEADER
from sessionflow.celery_ext.gate import Gate
from sessionflow.celery_ext.live import LiveSessions
from sessionflow.celery_ext.tracing import SessionTracer
from sessionflow.celery_ext.writer import Writer
from sessionflow.config import Config
from sessionflow.records import Dispatch, Run, utcnow
from sessionflow.store.sql import SQLStore

KEY = b"k" * 32
NODE = "parts@bench"
REPEATS = 5  # each figure is the median of this many loops
REGISTRATIONS = 150  # rows per registrar statement (about 0.2 s of tasks at 750/s)
RUNS = 64  # rows per writer statement (its FLUSH_ROWS)


def _nothing(*args: Any) -> None:
    """A callback or a step that does nothing (Celery's own pool callbacks, here)."""


class NoRows:
    def record_runs(self, rows: list[Run]) -> None:
        pass


def timed(work: Callable[[], None]) -> float:
    """Seconds ``work`` took, the cyclic garbage collector paused (its pauses, 100 ms and
    more in a big process, land in one loop or another and swamp a few microseconds)."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    finally:
        gc.enable()


# -- worker main process ---------------------------------------------------------------


def event_loop(n: int, store: Any) -> tuple[float, float, float]:
    writer = Writer(NoRows())  # type: ignore[arg-type]
    live = LiveSessions(NODE, "q", 10, store, None, writer.flush)  # type: ignore[arg-type]
    session = store.get_session(open_session(store, NODE, "q"))
    live.open(session)
    gate = Gate(SimpleNamespace(signing_key=KEY), live, writer)  # type: ignore[arg-type]

    def pool(target: Any, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        options["accept_callback"](1, 0.0)
        options["callback"]((False, None, 0.0))

    follow = gate.wrap_apply_async(pool)

    def process_task(req: Any) -> None:
        follow(
            None,
            ("trace", req.id, req.request_dict, "body"),
            None,
            accept_callback=_nothing,
            callback=_nothing,
            error_callback=_nothing,
        )

    gated = gate.wrap_process_task(process_task)

    def requests(in_session: bool) -> list[Any]:
        made = []
        for _ in range(n):
            task_id = str(uuid.uuid4())
            headers = {"id": task_id, "task": "bench.noop", "retries": 0, "hostname": NODE}
            if in_session:
                signature = tokens.sign_task(KEY, session.id, task_id)
                headers.update(
                    {SESSION_HEADER: session.id, QUEUE_HEADER: "q", SIG_HEADER: signature}
                )
            made.append(SimpleNamespace(id=task_id, name="bench.noop", request_dict=headers))
        return made

    def loop(in_session: bool) -> tuple[Callable[[], None], ...]:
        batch: list[Any] = []

        def prepare() -> None:
            batch[:] = requests(in_session)
            if in_session:  # the pool's claims, which the end callbacks remove
                for req in batch:
                    os.symlink("claimed", f"{live.dir}/{session.id}/{req.id}")

        def work() -> None:
            for req in batch:
                gated(req)

        return prepare, work, writer._ends.clear

    try:
        return _paired(loop, n)
    finally:
        live.remove_dir()


Loop = Callable[[bool], tuple[Callable[[], None], Callable[[], None], Callable[[], None]]]


def _paired(loop: Loop, n: int, repeats: int = REPEATS) -> tuple[float, float, float]:
    """(plain, session, session - plain) µs per task: medians over ``repeats`` pairs of
    loops, the extra the median of each pair's difference. ``loop(in_session)`` gives
    (prepare, work, clean up); only ``work`` is timed. Which of a pair goes first
    alternates, so drift hits both alike."""
    results: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats + 1):  # the first pair warms up
        order = (False, True) if repeat % 2 else (True, False)
        for in_session in order:
            prepare, work, clean = loop(in_session)
            prepare()
            took = timed(work)
            clean()
            if repeat:
                results[in_session].append(took / n * 1e6)
    plain, session = results[False], results[True]
    extra = statistics.median(s - p for p, s in zip(plain, session, strict=True))
    return statistics.median(plain), statistics.median(session), extra


# -- pool process ---------------------------------------------------------------------


def pool_process(n: int) -> tuple[float, float, float]:
    live_dir = tempfile.mkdtemp(
        prefix="sfparts-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    session_id = str(uuid.uuid4())
    os.makedirs(f"{live_dir}/{session_id}")
    flow = SimpleNamespace(live_dir=live_dir, own_queue="q", middleware=[], store=None)
    flow.middleware.append(BranchMiddleware(flow))
    task = SimpleNamespace(name="bench.noop")

    def inner(task_id: str, args: Any, kwargs: Any, request: Any) -> Any:
        return (None, None, 0.0, None)

    tracer = SessionTracer(flow, task, inner)  # type: ignore[arg-type]

    def loop(in_session: bool) -> tuple[Callable[[], None], ...]:
        batch: list[tuple[str, dict[str, Any]]] = []

        def prepare() -> None:
            for _ in range(n):
                task_id = str(uuid.uuid4())
                request = {"id": task_id, "task": "bench.noop", "hostname": NODE}
                if in_session:
                    request[SESSION_HEADER] = session_id
                batch.append((task_id, request))

        def work() -> None:
            for task_id, request in batch:
                tracer(task_id, (), {}, request)

        def clean() -> None:  # what the main process does at each task's end
            batch.clear()
            for name in os.listdir(f"{live_dir}/{session_id}"):
                os.unlink(f"{live_dir}/{session_id}/{name}")

        return prepare, work, clean

    try:
        return _paired(loop, n)
    finally:
        import shutil

        shutil.rmtree(live_dir, ignore_errors=True)


# -- client ---------------------------------------------------------------------------


def client(n: int, url: str) -> tuple[float, float, float]:
    app = Celery("benchparts", broker="memory://", set_as_current=False)  # no result backend
    app.conf.sessionflow_database_url = url

    @app.task(name="bench.noop", shared=False)  # type: ignore[untyped-decorator]
    def noop() -> None:
        pass

    flow = SessionFlow(app)
    flow.store.upgrade()
    session = flow.get_session(open_session(flow.store, NODE, "q"))
    task = app.tasks["bench.noop"]
    app.amqp.send_task_message = lambda *args, **kwargs: None  # publishing is not timed
    registrar = flow.registrar
    registrar._ensure_thread = lambda: None  # type: ignore[method-assign]  # rows: below

    # Celery's own send (~200 us) is in both: more, shorter pairs to see a few us through
    # its spread.
    count = max(1, n // 4)

    def loop(in_session: bool) -> tuple[Callable[[], None], ...]:
        send = (lambda: session.apply_async(task)) if in_session else task.apply_async

        def work() -> None:
            for _ in range(count):
                send()

        return _nothing, work, registrar._pending.clear

    try:
        return _paired(loop, count, repeats=4 * REPEATS)
    finally:
        flow.store.dispose()


# -- rows -----------------------------------------------------------------------------


def rows(url: str, batches: int) -> dict[str, tuple[float, float | None]]:
    """µs per task: (this process, database server or None) for each kind of row."""
    store = SQLStore(Config(database_url=url))
    store.upgrade()
    session_id = open_session(store, NODE, "q")

    def registrations() -> Callable[[], None]:
        tasks = tuple((str(uuid.uuid4()), "bench.noop") for _ in range(REGISTRATIONS))
        return lambda: store.dispatch(Dispatch(session_id, tasks)) and None

    def runs() -> Callable[[], None]:
        now = utcnow()
        batch = [
            Run(str(uuid.uuid4()), 0, session_id, "bench.noop", "SUCCESS", NODE, now, now)
            for _ in range(RUNS)
        ]
        return lambda: store.record_runs(batch)

    measured = {}
    try:
        for name, make, size in (
            ("registration", registrations, REGISTRATIONS),
            ("run", runs, RUNS),
        ):
            make()()
            writes = [make() for _ in range(batches)]  # the rows are made before timing
            server0, cpu0 = services_cpu()["postgres"], time.process_time()
            for write in writes:
                write()
            cpu1 = time.process_time()  # before reading /proc, which costs CPU too
            server1 = services_cpu()["postgres"]
            tasks = batches * size
            server = None
            if url.startswith("postgresql") and server0 is not None and server1 is not None:
                server = (server1 - server0) / tasks * 1e6
            measured[name] = ((cpu1 - cpu0) / tasks * 1e6, server)
    finally:
        store.dispose()
    return measured


# -- the run --------------------------------------------------------------------------


def scratch_postgres() -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"sfparts_{uuid.uuid4().hex[:12]}"

    def admin(sql: str) -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.encode())

    admin(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/{name}", lambda: admin(
        f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )


def line(label: str, plain: float, session: float, extra: float) -> str:
    return f"  {label:<44} {plain:8.1f} {session:9.1f} {extra:+8.1f}"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgres", help="stores for the rows")
    parser.add_argument("-n", type=int, default=20000, help="tasks per loop")
    parser.add_argument("--batches", type=int, default=40, help="statements per row figure")
    args = parser.parse_args(list(argv) if argv is not None else None)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if "postgres" in stores and not service_up(PG_HOST, PG_PORT):
        print(
            f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}: rows on SQLite only", file=sys.stderr
        )
        stores.remove("postgres")

    print("sessionflow bench_parts: each part of a session task in a loop of its own")
    print(environment_line())
    print(
        f"\nµs per task (medians of {REPEATS} pairs of loops of {args.n:,} tasks; client: "
        f"{4 * REPEATS} pairs of {args.n // 4:,}); extra: median of the pairs' differences"
    )
    print(f"  {'part':<44} {'plain':>8} {'session':>9} {'extra':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/parts.db"
        sqlite_store = SQLStore(Config(database_url=url))
        sqlite_store.upgrade()
        try:
            parts = [
                ("worker event loop: gate and pool callbacks", event_loop(args.n, sqlite_store)),
                ("pool process: tracer with the claim", pool_process(args.n)),
                ("client: apply_async without publishing", client(args.n, url)),
            ]
        finally:
            sqlite_store.dispose()
        for label, figures in parts:
            print(line(label, *figures))
        code_extra = sum(extra for _, (_, _, extra) in parts)
        print(f"  {'code, all parts':<44} {'':>8} {'':>9} {code_extra:+8.1f}")

        print(
            f"\nrows, µs of CPU per task ({REGISTRATIONS} registrations and {RUNS} runs a "
            f"statement, {args.batches} statements each)"
        )
        print(f"  {'store':<10} {'row':<14} {'this process':>13} {'db server':>10}")
        for store in stores:
            drop = _nothing
            if store == "postgres":
                store_url, drop = scratch_postgres()
            else:
                store_url = f"sqlite:///{tmp}/rows.db"
            try:
                measured = rows(store_url, args.batches)
            finally:
                drop()
            total = 0.0
            for name, (own, server) in measured.items():
                total += own + (server or 0.0)
                shown = "-" if server is None else f"{server:.1f}"
                print(f"  {store:<10} {name:<14} {own:13.1f} {shown:>10}")
            print(f"  {store:<10} {'both rows':<14} {total:13.1f} (process + server)")
            print(f"  {store:<10} code and rows: {code_extra + total:.1f} µs per task")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Session overhead against plain Celery, measured on the same worker, for each store in one run.

Prints one table with a column per session store (see bench/README.md):

(a) session-task throughput / plain-task throughput, same worker        target >= 0.97
(b) session creation p50 / plain task round-trip p50, 1 and 1,000 open  target <= 1.5
(c) session-task throughput with 1,000 open sessions / with 1           target >= 0.9
    worker CPU per session task / per plain task                        target <= 1.1
store statements, counted with SQLAlchemy engine events in every process:
    client, per Session.apply_async call (a task; a chain, group, chord of 10)  <= 1
    worker, before a task's body starts (pool processes + event loop), per task = 0
    worker, all processes and threads, per task under load (amortised)         <= 0.1

Run from the repository root::

    .venv/bin/python bench/bench_sessions.py                   # SQLite and PostgreSQL, ~8 min
    .venv/bin/python bench/bench_sessions.py --stores sqlite   # one store
    .venv/bin/python bench/bench_sessions.py --quick           # both stores, ~3 min

For each store it starts its own ``celery worker`` (prefork) on Redis, with its own
scratch store, queues and keys, and always stops it. The exit status is 0 whether or
not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import _sqlcount
from _common import (
    STORES,
    BenchError,
    Row,
    Stack,
    WorkerProcess,
    check_services,
    environment_line,
    fmt_list,
    interrupts_as_keyboard_interrupt,
    median,
    percentile,
    print_table,
    services_cpu,
    timed,
)
from _sqlcount import KINDS, Snapshot, StaleCounts, local_snapshot, read_dir
from benchapp import NOOP
from celery import chain, chord, group
from celery.result import ResultSet

CREATION_TIMEOUT = 30.0
EXECUTION_TIMEOUT = 3600.0  # every session outlives the run; the run closes them itself
SETTLE_S = 0.6  # default --settle: after a round's last result, before counts are read
CALLER = threading.main_thread().name  # the client thread that calls apply_async


@dataclass(frozen=True)
class Params:
    tasks: int  # tasks per throughput round
    rounds: int  # rounds of each kind (plain, session) per phase
    samples: int  # round trips and creations for (b)
    sessions: int  # open sessions on the worker for (c)
    concurrency: int  # prefork pool processes
    calls: int  # apply_async calls per canvas kind for the statement counts

    @property
    def result_timeout(self) -> float:
        return max(60.0, self.tasks / 20)


FULL = Params(tasks=1500, rounds=5, samples=200, sessions=1000, concurrency=2, calls=50)
QUICK = Params(tasks=250, rounds=3, samples=40, sessions=1000, concurrency=2, calls=10)


@dataclass(frozen=True)
class Canvas:
    """What one counted ``apply_async`` call sends."""

    name: str
    tasks: int  # tasks per call
    build: Callable[[Any], Any]  # the noop task -> the task or canvas to send


CANVASES = (
    Canvas("task", 1, lambda noop: noop),
    Canvas("chain of 10", 10, lambda noop: chain(*[noop.s() for _ in range(10)])),
    Canvas("group of 10", 10, lambda noop: group([noop.s() for _ in range(10)])),
    Canvas("chord of 10 + body", 11, lambda noop: chord([noop.s() for _ in range(10)], noop.s())),
)


@dataclass
class Round:
    """``calls`` sends (``tasks`` tasks), then every result awaited, then ``--settle`` idle.

    Statement counts are ``Snapshot.as_dict()`` differences: ``client_send`` while
    sending, ``client_wait`` while awaiting the results (this process, every thread),
    ``worker`` every worker process from the end of the previous window to ``--settle``
    seconds after the last result (``window_s``).
    """

    kind: str
    tasks: int
    send_s: float  # time spent sending (client side, includes Session.apply_async's SQL)
    total_s: float  # first send until the last result is in
    client_cpu_s: float  # CPU time of this (client) process, first send to last result
    worker_cpu_s: float  # CPU time of the worker's main and pool processes in the window
    # The same window split: the worker's main process (event loop, writer, ticker
    # threads), its pool processes, and the database and Redis servers on this machine
    # (None: not found here), which share the CPUs with client and worker.
    worker_main_cpu_s: float = 0.0
    worker_pool_cpu_s: float = 0.0
    db_cpu_s: float | None = None
    redis_cpu_s: float | None = None
    calls: int = 0
    canvas: str = "task"
    window_s: float = 0.0
    client_send: dict[str, int] = field(default_factory=dict)
    client_wait: dict[str, int] = field(default_factory=dict)
    worker: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tasks / self.total_s


@dataclass
class Phase:
    """Interleaved plain and session rounds with a given number of open sessions."""

    open_sessions: int
    rounds: list[Round] = field(default_factory=list)

    def of(self, kind: str) -> list[Round]:
        return [r for r in self.rounds if r.kind == kind]

    def rates(self, kind: str) -> list[float]:
        return [r.rate for r in self.of(kind)]

    def send_ms_per_task(self, kind: str) -> float:
        return median([1000 * r.send_s / r.tasks for r in self.of(kind)])

    def cpu_ms_per_task(self, kind: str) -> tuple[float, float]:
        """Median CPU milliseconds per task: (client, worker)."""
        rounds = self.of(kind)
        return (
            median([1000 * r.client_cpu_s / r.tasks for r in rounds]),
            median([1000 * r.worker_cpu_s / r.tasks for r in rounds]),
        )

    def cpu_parts_us(self, kind: str) -> dict[str, float | None]:
        """Median CPU microseconds per task of each part of the machine, and ``all``."""
        rounds = self.of(kind)

        def per_task(value: Callable[[Round], float | None]) -> float | None:
            values = [value(r) for r in rounds]
            if any(v is None for v in values):
                return None
            pairs = zip(values, rounds, strict=True)
            return median([1e6 * cast(float, v) / r.tasks for v, r in pairs])

        parts: dict[str, float | None] = {
            "client": per_task(lambda r: r.client_cpu_s),
            "worker main": per_task(lambda r: r.worker_main_cpu_s),
            "worker pool": per_task(lambda r: r.worker_pool_cpu_s),
            "database": per_task(lambda r: r.db_cpu_s),
            "redis": per_task(lambda r: r.redis_cpu_s),
        }
        parts["all"] = per_task(
            lambda r: r.client_cpu_s + r.worker_cpu_s + (r.db_cpu_s or 0.0) + (r.redis_cpu_s or 0.0)
        )
        return parts

    def median_rate(self, kind: str) -> float:
        return median(self.rates(kind))

    def paired_ratios(self) -> list[float]:
        return [s / p for p, s in zip(self.rates("plain"), self.rates("session"), strict=True)]


@dataclass
class Latencies:
    """Interleaved plain round trips and session creations, in milliseconds."""

    open_sessions: int
    plain_ms: list[float] = field(default_factory=list)
    create_ms: list[float] = field(default_factory=list)
    complete_ms: list[float] = field(default_factory=list)
    client_create: dict[str, int] = field(default_factory=dict)  # all create_session calls
    client_complete: dict[str, int] = field(default_factory=dict)  # all complete() calls
    worker: dict[str, int] = field(default_factory=dict)  # the whole block


@dataclass
class Results:
    params: Params
    store: str
    counted: bool
    phase1: Phase
    phase2: Phase
    latency1: Latencies
    latency2: Latencies
    canvases: list[Round] = field(default_factory=list)
    open_s: float = 0.0
    open_ms: list[float] = field(default_factory=list)
    open_client: dict[str, int] = field(default_factory=dict)
    open_worker: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass(frozen=True)
class Cpu:
    """CPU seconds so far: the worker's main and pool processes, database, Redis."""

    main: float
    pool: float
    db: float | None
    redis: float | None

    @classmethod
    def now(cls, worker: WorkerProcess) -> Cpu:
        main, pool = worker.cpu_split()
        services = services_cpu()
        return cls(main, pool, services["postgres"], services["redis"])

    @property
    def worker(self) -> float:
        return self.main + self.pool

    def __sub__(self, other: Cpu) -> Cpu:
        def minus(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a - b

        return Cpu(
            self.main - other.main,
            self.pool - other.pool,
            minus(self.db, other.db),
            minus(self.redis, other.redis),
        )


WorkerState = tuple[Snapshot, Cpu, float]  # statement counts, CPU so far, perf_counter


class Bench:
    def __init__(
        self,
        stack: Stack,
        worker: WorkerProcess,
        params: Params,
        count: bool = True,
        settle: float = SETTLE_S,
    ) -> None:
        self.stack = stack
        self.settle = settle
        self.worker = worker
        self.params = params
        self.count = count
        self.flow = stack.flow
        self.noop = stack.task(NOOP)
        self.app = stack.app
        self._baseline: WorkerState | None = None  # worker state at the end of the last window

    def progress(self, message: str) -> None:
        progress(f"[{self.stack.store}] {message}")

    # -- primitives -------------------------------------------------------

    def create(self) -> Any:
        return self.flow.create_session(
            creation_timeout=CREATION_TIMEOUT, execution_timeout=EXECUTION_TIMEOUT
        )

    def worker_state(self) -> WorkerState:
        """Wait ``settle`` s, then read the workers' statement counts (all fresh) and CPU."""
        time.sleep(self.settle)
        snapshot = Snapshot()
        if self.count:
            try:
                snapshot = read_dir(self.stack.count_dir, time.time())
            except StaleCounts as exc:
                raise BenchError(f"{exc}; is the worker stuck?") from None
        return snapshot, Cpu.now(self.worker), time.perf_counter()

    def client_counts(self) -> Snapshot:
        return local_snapshot() if self.count else Snapshot()

    def round(
        self,
        kind: str,
        send: Callable[[], Any],
        calls: int,
        *,
        tasks: int | None = None,
        canvas: str = "task",
    ) -> Round:
        base_counts, base_cpu, base_t = self._baseline or self.worker_state()
        client0 = self.client_counts()
        client_cpu = time.process_time()
        started = time.perf_counter()
        results = [send() for _ in range(calls)]
        sent = time.perf_counter()
        client1 = self.client_counts()
        timeout = max(self.params.result_timeout, (tasks or calls) / 20)
        ResultSet(leaves(results), app=self.app).join_native(timeout=timeout)
        ended = time.perf_counter()
        client_cpu_s = time.process_time() - client_cpu
        client2 = self.client_counts()
        self._baseline = end_counts, end_cpu, end_t = self.worker_state()
        cpu = end_cpu - base_cpu
        return Round(
            kind,
            tasks or calls,
            send_s=sent - started,
            total_s=ended - started,
            client_cpu_s=client_cpu_s,
            worker_cpu_s=cpu.worker,
            worker_main_cpu_s=cpu.main,
            worker_pool_cpu_s=cpu.pool,
            db_cpu_s=cpu.db,
            redis_cpu_s=cpu.redis,
            calls=calls,
            canvas=canvas,
            window_s=end_t - base_t,
            client_send=(client1 - client0).as_dict(),
            client_wait=(client2 - client1).as_dict(),
            worker=(end_counts - base_counts).as_dict(),
        )

    def send_and_wait(self, results: list[Any]) -> None:
        ResultSet(leaves(results), app=self.app).join_native(timeout=self.params.result_timeout)

    def phase(self, session: Any, open_sessions: int) -> Phase:
        """Rounds alternate plain/session, and which goes first, to spread drift evenly."""
        phase = Phase(open_sessions)
        plain = ("plain", self.noop.delay)
        in_session = ("session", lambda: session.apply_async(self.noop))
        for i in range(self.params.rounds):
            for kind, send in (plain, in_session) if i % 2 == 0 else (in_session, plain):
                phase.rounds.append(self.round(kind, send, self.params.tasks))
                self.progress(
                    f"{open_sessions} open, {kind:<7} {phase.rounds[-1].rate:7.0f} tasks/s"
                )
        return phase

    def canvas_rounds(self, session: Any) -> list[Round]:
        """Small rounds per canvas kind, plain and in the session, for the statement counts."""
        rounds = []
        for canvas in CANVASES:
            build = functools.partial(canvas.build, self.noop)
            sends: tuple[tuple[str, Callable[[], Any]], ...] = (
                ("plain", functools.partial(send_plain, build)),
                ("session", functools.partial(send_in_session, session, build)),
            )
            for kind, send in sends:
                rounds.append(
                    self.round(
                        kind,
                        send,
                        self.params.calls,
                        tasks=self.params.calls * canvas.tasks,
                        canvas=canvas.name,
                    )
                )
            self.progress(f"counted {self.params.calls} calls of {canvas.name}")
        return rounds

    def latencies(self, open_sessions: int) -> Latencies:
        lat = Latencies(open_sessions)
        created: list[Any] = []
        create_counts, complete_counts = Snapshot(), Snapshot()
        base = self._baseline or self.worker_state()
        self._baseline = None

        def plain() -> None:
            lat.plain_ms.append(1000 * timed(lambda: self.noop.delay().get(timeout=30)))

        def create() -> None:
            nonlocal create_counts, complete_counts
            before = self.client_counts()
            lat.create_ms.append(1000 * timed(lambda: created.append(self.create())))
            between = self.client_counts()
            lat.complete_ms.append(1000 * timed(created.pop().complete))  # not in the figure
            after = self.client_counts()
            create_counts += between - before
            complete_counts += after - between

        for i in range(self.params.samples):
            for step in (plain, create) if i % 2 == 0 else (create, plain):
                step()
        self._baseline = end = self.worker_state()
        lat.client_create = create_counts.as_dict()
        lat.client_complete = complete_counts.as_dict()
        lat.worker = (end[0] - base[0]).as_dict()
        return lat

    # -- the run ----------------------------------------------------------

    def run(self) -> Results:
        p = self.params
        started = time.perf_counter()
        self.progress("warming up")
        main = self.create()
        warm = max(50, p.tasks // 4)
        for canvas in CANVASES:
            n = warm if canvas.tasks == 1 else 3
            build = functools.partial(canvas.build, self.noop)
            self.send_and_wait([send_plain(build) for _ in range(n)])
            self.send_and_wait([send_in_session(main, build) for _ in range(n)])
        for _ in range(10):
            self.noop.delay().get(timeout=30)
            self.create().complete()
        self._baseline = None

        canvases = self.canvas_rounds(main)
        phase1 = self.phase(main, 1)
        self.progress("(b) round trips and creations")
        latency1 = self.latencies(1)

        self.progress(f"opening {p.sessions - 1} more sessions")
        others: list[Any] = []
        open_ms: list[float] = []
        base = self.worker_state()
        client0 = self.client_counts()
        open_started = time.perf_counter()
        for _ in range(p.sessions - 1):
            open_ms.append(1000 * timed(lambda: others.append(self.create())))
        open_s = time.perf_counter() - open_started
        open_client = (self.client_counts() - client0).as_dict()
        self._baseline = end = self.worker_state()
        open_worker = (end[0] - base[0]).as_dict()

        try:
            phase2 = self.phase(main, p.sessions)
            self.progress(f"round trips and creations with {p.sessions} open")
            latency2 = self.latencies(p.sessions)
        finally:
            self.progress("completing sessions")
            for session in [main, *others]:
                session.complete()
        return Results(
            params=p,
            store=self.stack.store,
            counted=self.count,
            phase1=phase1,
            phase2=phase2,
            latency1=latency1,
            latency2=latency2,
            canvases=canvases,
            open_s=open_s,
            open_ms=open_ms,
            open_client=open_client,
            open_worker=open_worker,
            wall_s=time.perf_counter() - started,
        )


def send_plain(build: Callable[[], Any]) -> Any:
    return build().apply_async()


def send_in_session(session: Any, build: Callable[[], Any]) -> Any:
    return session.apply_async(build())


def leaves(results: Iterable[Any]) -> list[Any]:
    """The task results to await: a group's members, a chain's or chord's last task."""
    out: list[Any] = []
    for result in results:
        if isinstance(result, ResultSet):
            out.extend(leaves(result.results))
        else:
            out.append(result)
    return out


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# -- statement figures ------------------------------------------------------------


def summed(counts: Iterable[dict[str, int]]) -> Snapshot:
    total = Snapshot()
    for c in counts:
        total += Snapshot.from_dict(c)
    return total


def worker_counts(rounds: Sequence[Round]) -> tuple[Snapshot, int]:
    return summed(r.worker for r in rounds), sum(r.tasks for r in rounds)


def before_body(snapshot: Snapshot) -> int:
    """Statements on a task's path to its body.

    In pool processes: from entering Celery's trace function to ``task_prerun``
    (phase ``before``) and on to the first line of the task's own code (``prerun``:
    wrappers of ``task.run``), plus anything on their main thread outside a trace
    (phase ``-``: nothing today; counted so that a trace hook that stopped working
    errs towards "on the path"). In the worker's main process: everything on
    ``MainThread``, the event loop (its timers too: see the raw section).
    """
    return (
        snapshot.total(role="pool", phase="before")
        + snapshot.total(role="pool", phase="prerun")
        + snapshot.total(role="pool", thread="MainThread", phase="-")
        + snapshot.total(role="main", thread="MainThread")
    )


def per_task_before(rounds: Sequence[Round]) -> float:
    snapshot, tasks = worker_counts(rounds)
    return before_body(snapshot) / tasks


def per_task_all(rounds: Sequence[Round], role: str | None = None) -> float:
    snapshot, tasks = worker_counts(rounds)
    return snapshot.total(role=role) / tasks


def bypassing(snapshot: Snapshot, **where: Any) -> int:
    """Driver-level statements that the engine events did not see (``_sqlcount``)."""
    seen = sum(snapshot.total(k, **where) for k in ("sql", "txctl", "ping"))
    return snapshot.total("drv", **where) - seen


def bypass_per(rounds: Sequence[Round], attr: str, **where: Any) -> float:
    """abs(bypassing statements) per call (client) or per task (worker) in ``rounds``."""
    snapshot = summed(getattr(r, attr) for r in rounds)
    per = sum(r.calls if attr.startswith("client") else r.tasks for r in rounds)
    return abs(bypassing(snapshot, **where)) / per


def client_per_call(r: Results, kind: str, canvas: str) -> float:
    rd = next(x for x in r.canvases if x.kind == kind and x.canvas == canvas)
    return Snapshot.from_dict(rd.client_send).total(thread=CALLER) / rd.calls


def timer_rate(r: Results) -> float:
    """Statements per second on the worker's event loop during plain rounds: its timers."""
    rounds = r.phase1.of("plain")
    snapshot, _ = worker_counts(rounds)
    return snapshot.total(role="main", thread="MainThread") / sum(x.window_s for x in rounds)


# -- report -------------------------------------------------------------------


def table(results: dict[str, Results]) -> list[Row]:
    def each(fn: Callable[[Results], float | None], counted: bool = False) -> dict[str, Any]:
        return {s: (None if counted and not r.counted else fn(r)) for s, r in results.items()}

    n = next(iter(results.values())).params.sessions

    def cpu(r: Results, kind: str, which: int) -> float:
        return r.phase1.cpu_ms_per_task(kind)[which]

    rows = [
        Row("speed"),
        Row(
            "(a) session / plain task throughput",
            each(lambda r: r.phase1.median_rate("session") / r.phase1.median_rate("plain")),
            0.97,
            higher=True,
        ),
        Row(
            "(b) creation p50 / plain round trip p50, 1 open",
            each(lambda r: median(r.latency1.create_ms) / median(r.latency1.plain_ms)),
            1.5,
        ),
        Row(
            f"(b) the same with {n:,} open",
            each(lambda r: median(r.latency2.create_ms) / median(r.latency2.plain_ms)),
            1.5,
        ),
        Row(
            f"(c) session throughput, {n:,} open / 1 open",
            each(lambda r: r.phase2.median_rate("session") / r.phase1.median_rate("session")),
            0.9,
            higher=True,
        ),
        Row("worker CPU ms per plain task", each(lambda r: cpu(r, "plain", 1))),
        Row("worker CPU ms per session task", each(lambda r: cpu(r, "session", 1))),
        Row(
            "worker CPU, session task / plain task",
            each(lambda r: cpu(r, "session", 1) / cpu(r, "plain", 1)),
            1.1,
        ),
        Row("client CPU ms per plain task", each(lambda r: cpu(r, "plain", 0))),
        Row("client CPU ms per session task", each(lambda r: cpu(r, "session", 0))),
        Row(
            "machine CPU (client, worker, db, Redis), session / plain",
            each(lambda r: machine_ratio(r.phase1)),
        ),
        Row("store statements (SQLAlchemy engine events)"),
    ]
    for canvas in CANVASES:
        rows.append(
            Row(
                f"client, per Session.apply_async: {canvas.name}",
                each(functools.partial(client_per_call, kind="session", canvas=canvas.name), True),
                1,
                digits=2,
            )
        )
    rows += [
        Row(
            "worker, before body, per task",
            each(lambda r: per_task_before(r.phase1.of("session")), True),
            0,
        ),
        Row(
            "worker, amortised per task, 1 open",
            each(lambda r: per_task_all(r.phase1.of("session")), True),
            0.1,
        ),
        Row(
            f"worker, amortised per task, {n:,} open",
            each(lambda r: per_task_all(r.phase2.of("session")), True),
            0.1,
        ),
        Row("checks of the counter"),
        Row(
            "client, bypassing engine events, per call",
            each(lambda r: bypass_per(r.canvases, "client_send", thread=CALLER), True),
            0.01,
        ),
        Row(
            "worker, bypassing engine events, per task",
            each(lambda r: bypass_per([*r.phase1.rounds, *r.phase2.rounds], "worker"), True),
            0.01,
        ),
        Row(
            "plain: client, per send (largest over the canvases)",
            each(lambda r: max(client_per_call(r, "plain", c.name) for c in CANVASES), True),
            0,
            digits=2,
        ),
        Row(
            "plain: worker pool processes, per task",
            each(lambda r: per_task_all(r.phase1.of("plain"), role="pool"), True),
            0,
        ),
        Row(
            "plain: worker main process, per task (timers)",
            each(lambda r: per_task_all(r.phase1.of("plain"), role="main"), True),
        ),
    ]
    return rows


def print_report(results: dict[str, Results]) -> None:
    r0 = next(iter(results.values()))
    p = r0.params
    print()
    print(
        f"sessionflow bench_sessions: Redis broker + result backend, "
        f"store{'s' if len(results) > 1 else ''} {', '.join(results)}, "
        f"1 prefork worker -c {p.concurrency} per store"
    )
    print(environment_line())
    print()
    print_table(table(results), list(results))
    for r in results.values():
        print()
        print_raw(r)


def print_raw(r: Results) -> None:
    p = r.params
    print(f"raw numbers, {r.store} store (measured for {r.wall_s:.0f} s)")
    for phase in (r.phase1, r.phase2):
        print(
            f"  throughput with {phase.open_sessions} open session(s), "
            f"{p.tasks} tasks per round, rounds interleaved"
        )
        for kind in ("plain", "session"):
            client_cpu, worker_cpu = phase.cpu_ms_per_task(kind)
            print(
                f"    {kind:<7} tasks/s {fmt_list(phase.rates(kind))}  "
                f"median {phase.median_rate(kind):.0f}; per task: send "
                f"{phase.send_ms_per_task(kind):.3f} ms, CPU client {client_cpu:.3f} ms "
                f"+ worker {worker_cpu:.3f} ms"
            )
        print_cpu_parts(phase)
        ratios = phase.paired_ratios()
        print(
            f"    session/plain per round pair {fmt_list(ratios, 3)}  "
            f"median {median(ratios):.3f}; ratio of medians "
            f"{phase.median_rate('session') / phase.median_rate('plain'):.3f}"
        )
    plain_drift = r.phase2.median_rate("plain") / r.phase1.median_rate("plain")
    session_change = r.phase2.median_rate("session") / r.phase1.median_rate("session")
    print(
        f"    plain throughput, {p.sessions} open / 1 open: {plain_drift:.3f} (machine drift); "
        f"(c) corrected for it: {session_change / plain_drift:.3f}"
    )
    c1, w1 = r.phase2.cpu_ms_per_task("session")
    c0, w0 = r.phase2.cpu_ms_per_task("plain")
    print(
        f"    CPU per session task / per plain task with {p.sessions} open: "
        f"worker {w1 / w0:.3f}, client {c1 / c0:.3f}"
    )
    for lat in (r.latency1, r.latency2):
        print(f"  latency with {lat.open_sessions} open session(s), {p.samples} samples each (ms)")
        for name, values in (
            ("plain task round trip", lat.plain_ms),
            ("create_session", lat.create_ms),
            ("complete (not in (b))", lat.complete_ms),
        ):
            print(
                f"    {name:<22} p50 {median(values):6.2f}  p90 {percentile(values, 90):6.2f}  "
                f"max {max(values):6.2f}"
            )
        ratio = median(lat.create_ms) / median(lat.plain_ms)
        print(f"    creation p50 / round trip p50 = {ratio:.3f}")
    if r.open_ms:
        print(
            f"  opening {len(r.open_ms)} sessions took {r.open_s:.1f} s "
            f"(p50 {median(r.open_ms):.2f} ms, p90 {percentile(r.open_ms, 90):.2f} ms)"
        )
    if r.counted:
        print_statements(r)


def machine_ratio(phase: Phase) -> float | None:
    """CPU of the whole machine per session task / per plain task: on a machine that
    client, worker and servers share, (a) cannot be better than its inverse."""
    session, plain = phase.cpu_parts_us("session")["all"], phase.cpu_parts_us("plain")["all"]
    return None if session is None or plain is None else session / plain


def print_cpu_parts(phase: Phase) -> None:
    """Where each kind of task spends CPU on this machine, and how the session task's
    extra CPU splits between the parts (what bounds (a) on a shared machine)."""
    plain, session = phase.cpu_parts_us("plain"), phase.cpu_parts_us("session")

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    for kind, parts in (("plain", plain), ("session", session)):
        text = ", ".join(f"{name} {shown(value)}" for name, value in parts.items())
        print(f"    {kind:<7} CPU us per task: {text}")
    extra = ", ".join(
        f"{name} {session[name] - plain[name]:+.0f}"  # type: ignore[operator]
        for name in plain
        if plain[name] is not None and session[name] is not None
    )
    print(f"    session - plain, CPU us per task: {extra}")


def print_statements(r: Results) -> None:
    print(
        "  store statements: sql = statements, txctl = BEGIN/SAVEPOINT sent as statements, "
        "tx = transactions ended (commit/rollback), ping = pre-ping checkouts, "
        "drv = statements the DB-API driver ran"
    )
    print("  client, per call, calling thread:")
    for canvas in CANVASES:
        for kind in ("session", "plain"):
            rd = next(x for x in r.canvases if x.kind == kind and x.canvas == canvas.name)
            send = Snapshot.from_dict(rd.client_send)
            wait = Snapshot.from_dict(rd.client_wait)
            others = (send + wait).total() - (send + wait).total(thread=CALLER)
            print(
                f"    {kind:<7} {canvas.name:<19} {kinds_text(send, rd.calls, thread=CALLER)}"
                f"; awaiting results {wait.total(thread=CALLER) / rd.calls:.2f} sql"
                f"; other threads {others / rd.calls:.2f} sql"
            )
    n1, n2 = len(r.latency1.create_ms), len(r.latency2.create_ms)
    for label, counts, calls in (
        ("create_session, 1 open", r.latency1.client_create, n1),
        ("complete, 1 open", r.latency1.client_complete, n1),
        (f"create_session, {r.params.sessions} open", r.latency2.client_create, n2),
        (f"complete, {r.params.sessions} open", r.latency2.client_complete, n2),
    ):
        print(f"    {label:<27} {kinds_text(Snapshot.from_dict(counts), calls, thread=CALLER)}")
    rounds = [*r.phase1.rounds, *r.phase2.rounds]
    background = summed(x.client_send for x in rounds) + summed(x.client_wait for x in rounds)
    seconds = sum(x.total_s for x in rounds)
    for (_role, thread, _phase), count in sorted(by_thread(background).items()):
        if thread != CALLER:
            print(
                f"    other client thread {thread}: {count / seconds:.1f} sql/s "
                f"during throughput rounds"
            )
    for title, rds in (
        ("worker, session tasks, 1 open", r.phase1.of("session")),
        ("worker, plain tasks, 1 open", r.phase1.of("plain")),
        (f"worker, session tasks, {r.params.sessions} open", r.phase2.of("session")),
    ):
        snapshot, tasks = worker_counts(rds)
        print(f"  {title}, per task ({tasks} tasks in {len(rds)} rounds):")
        print_breakdown(snapshot, tasks)
        seen = [snapshot.marks.get(f"pool:{m}", 0) for m in ("trace", "prerun", "body")]
        print(
            "    check: per task, traces {:.3f}, task_prerun {:.3f}, bodies {:.3f} "
            "(1.000 each when the phase hooks work)".format(*(n / tasks for n in seen))
        )
        if any(abs(n - tasks) > tasks / 100 for n in seen):
            print(
                "    WARNING: the phase hooks did not see every task: before/after body "
                "attribution in pool processes is not reliable"
            )
    rate = timer_rate(r)
    sessions = r.phase1.of("session")
    snapshot, tasks = worker_counts(sessions)
    timers = rate * sum(x.window_s for x in sessions)
    print(
        f"  worker event loop in plain rounds: {rate:.2f} sql/s (its timers); before body "
        f"per session task without that rate: {(before_body(snapshot) - timers) / tasks:.3f}"
    )
    print("  worker, per task, per canvas kind (session; plain):")
    for canvas in CANVASES:
        parts = []
        for kind in ("session", "plain"):
            rd = next(x for x in r.canvases if x.kind == kind and x.canvas == canvas.name)
            snap = Snapshot.from_dict(rd.worker)
            parts.append(
                f"{snap.total() / rd.tasks:.2f} all, {before_body(snap) / rd.tasks:.2f} before body"
            )
        print(f"    {canvas.name:<19} {'; '.join(parts)}")
    if r.open_ms:
        opened = len(r.open_ms)
        print(f"  opening {opened} sessions, per session:")
        print(f"    client {kinds_text(Snapshot.from_dict(r.open_client), opened, thread=CALLER)}")
        print_breakdown(Snapshot.from_dict(r.open_worker), opened)


def kinds_text(snapshot: Snapshot, per: int, **where: Any) -> str:
    return "  ".join(f"{k} {snapshot.total(k, **where) / per:.2f}" for k in KINDS)


def by_thread(snapshot: Snapshot, kind: str = "sql") -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for (role, thread, phase, k), n in snapshot.counts.items():
        if k == kind:
            out[(role, thread, phase)] = out.get((role, thread, phase), 0) + n
    return out


def print_breakdown(snapshot: Snapshot, per: int) -> None:
    """One line per (process role, thread, phase): each kind of count divided by ``per``."""
    keys = sorted({(role, thread, phase) for role, thread, phase, _ in snapshot.counts})
    if not keys:
        print("    (no statements)")
    for role, thread, phase in keys:
        values = "  ".join(
            f"{k} {snapshot.counts.get((role, thread, phase, k), 0) / per:.3f}" for k in KINDS
        )
        print(f"    {role:<6} {thread:<24} {phase:<7} {values}")


# -- command line ---------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--stores",
        default=",".join(STORES),
        help="comma-separated session stores, measured one after the other "
        f"(default {','.join(STORES)})",
    )
    parser.add_argument("--store", choices=STORES, help="one store (same as --stores STORE)")
    parser.add_argument("--quick", action="store_true", help="fewer tasks and samples (~3 min)")
    parser.add_argument("--tasks", type=int, help="tasks per throughput round")
    parser.add_argument("--rounds", type=int, help="rounds of each kind per phase")
    parser.add_argument("--samples", type=int, help="latency samples of each kind for (b)")
    parser.add_argument("--sessions", type=int, help="open sessions for (c) (default 1000)")
    parser.add_argument("--concurrency", type=int, help="worker pool processes (default 2)")
    parser.add_argument("--calls", type=int, help="counted apply_async calls per canvas kind")
    parser.add_argument(
        "--no-count", action="store_true", help="do not count store statements (speed only)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help=f"seconds to wait after a round before reading worker counts (default {SETTLE_S})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep worker logs and SQLite files")
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> Params:
    base = QUICK if args.quick else FULL
    values = asdict(base)
    for name in values:
        given = getattr(args, name, None)
        if given is not None:
            if given < 1:
                raise BenchError(f"--{name} must be at least 1")
            values[name] = given
    return Params(**values)


def stores_from(args: argparse.Namespace) -> list[str]:
    if args.store:
        return [args.store]
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in stores if s not in STORES]
    if unknown or not stores or len(set(stores)) != len(stores):
        raise BenchError(f"--stores takes distinct names from {', '.join(STORES)}")
    return stores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = params_from(args)
        stores = stores_from(args)
        if args.settle <= 0.5:
            raise BenchError(
                "--settle must be more than 0.5 s: trailing worker work must end first"
            )
        check_services(stores)
    except BenchError as exc:
        print(f"bench_sessions: {exc}", file=sys.stderr)
        return 2
    count = not args.no_count
    if count:
        _sqlcount.install("client")
    results: dict[str, Results] = {}
    status = 0
    try:
        with interrupts_as_keyboard_interrupt():
            for store in stores:
                with Stack(store=store, keep=args.keep, count=count) as stack:
                    worker = stack.start_worker(
                        "bench", concurrency=params.concurrency, max_sessions=params.sessions + 10
                    )
                    stack.wait_ready(worker)
                    bench = Bench(stack, worker, params, count, settle=args.settle)
                    results[store] = bench.run()
    except BenchError as exc:
        print(f"bench_sessions: {exc}", file=sys.stderr)
        status = 2
    except Exception:  # report the stores measured so far; the stack is cleaned up already
        traceback.print_exc()
        status = 1
    except KeyboardInterrupt:
        print("bench_sessions: interrupted; workers stopped, scratch data removed", file=sys.stderr)
        return 130
    if results:
        print_report(results)
        if args.json:
            out = {
                "environment": environment_line(),
                "table": [row.as_dict() for row in table(results)],
                "stores": {store: asdict(r) for store, r in results.items()},
            }
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())

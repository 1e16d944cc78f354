"""Session overhead against plain Celery, measured on the same worker in one run.

Prints three ratios (see bench/README.md):

(a) session-task throughput / plain-task throughput, same worker      target >= 0.97
(b) session creation p50 / plain task round-trip p50                  target <= 1.5
(c) session-task throughput with 1,000 open sessions / with 1         target >= 0.9

Run from the repository root::

    .venv/bin/python bench/bench_sessions.py                  # SQLite store, ~3.5 min
    .venv/bin/python bench/bench_sessions.py --store postgres # ~5 min
    .venv/bin/python bench/bench_sessions.py --quick          # ~1 min

It starts its own ``celery worker`` (prefork) on Redis and always stops it. The
exit status is 0 whether or not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from _common import (
    STORES,
    BenchError,
    Figure,
    Stack,
    WorkerProcess,
    check_services,
    environment_line,
    fmt_list,
    interrupts_as_keyboard_interrupt,
    median,
    percentile,
    print_figures,
    timed,
)
from benchapp import NOOP
from celery.result import ResultSet

CREATION_TIMEOUT = 30.0
EXECUTION_TIMEOUT = 3600.0  # every session outlives the run; the run closes them itself


@dataclass(frozen=True)
class Params:
    tasks: int  # tasks per throughput round
    rounds: int  # rounds of each kind (plain, session) per phase
    samples: int  # round trips and creations for (b)
    sessions: int  # open sessions on the worker for (c)
    concurrency: int  # prefork pool processes

    @property
    def result_timeout(self) -> float:
        return max(60.0, self.tasks / 20)


FULL = Params(tasks=2000, rounds=5, samples=200, sessions=1000, concurrency=2)
QUICK = Params(tasks=500, rounds=3, samples=60, sessions=1000, concurrency=2)


@dataclass
class Round:
    """One throughput round: ``tasks`` sent, then every result awaited."""

    kind: str
    tasks: int
    send_s: float  # time spent sending (client side, includes Session.apply_async's SQL)
    total_s: float  # first send until the last result is in
    client_cpu_s: float  # CPU time of this (client) process during the round
    worker_cpu_s: float  # CPU time of the worker's main and pool processes during the round

    @property
    def rate(self) -> float:
        return self.tasks / self.total_s


@dataclass
class Phase:
    """Interleaved plain and session rounds with a given number of open sessions."""

    open_sessions: int
    rounds: list[Round] = field(default_factory=list)

    def rates(self, kind: str) -> list[float]:
        return [r.rate for r in self.rounds if r.kind == kind]

    def send_ms_per_task(self, kind: str) -> float:
        return median([1000 * r.send_s / r.tasks for r in self.rounds if r.kind == kind])

    def cpu_ms_per_task(self, kind: str) -> tuple[float, float]:
        """Median CPU milliseconds per task: (client, worker)."""
        rounds = [r for r in self.rounds if r.kind == kind]
        return (
            median([1000 * r.client_cpu_s / r.tasks for r in rounds]),
            median([1000 * r.worker_cpu_s / r.tasks for r in rounds]),
        )

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


@dataclass
class Results:
    params: Params
    store: str
    phase1: Phase
    phase2: Phase
    latency1: Latencies
    latency2: Latencies
    open_s: float = 0.0
    open_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0


class Bench:
    def __init__(self, stack: Stack, worker: WorkerProcess, params: Params) -> None:
        self.stack = stack
        self.worker = worker
        self.params = params
        self.flow = stack.flow
        self.noop = stack.task(NOOP)
        self.app = stack.app

    # -- primitives -------------------------------------------------------

    def create(self) -> Any:
        return self.flow.create_session(
            creation_timeout=CREATION_TIMEOUT, execution_timeout=EXECUTION_TIMEOUT
        )

    def round(self, kind: str, send: Callable[[], Any], tasks: int) -> Round:
        worker_cpu = self.worker.cpu_seconds()
        client_cpu = time.process_time()
        started = time.perf_counter()
        results = [send() for _ in range(tasks)]
        sent = time.perf_counter()
        ResultSet(results, app=self.app).join_native(timeout=self.params.result_timeout)
        ended = time.perf_counter()
        return Round(
            kind,
            tasks,
            send_s=sent - started,
            total_s=ended - started,
            client_cpu_s=time.process_time() - client_cpu,
            worker_cpu_s=self.worker.cpu_seconds() - worker_cpu,
        )

    def phase(self, session: Any, open_sessions: int) -> Phase:
        """Rounds alternate plain/session, and which goes first, to spread drift evenly."""
        phase = Phase(open_sessions)
        plain = ("plain", self.noop.delay)
        in_session = ("session", lambda: session.apply_async(self.noop))
        for i in range(self.params.rounds):
            for kind, send in (plain, in_session) if i % 2 == 0 else (in_session, plain):
                phase.rounds.append(self.round(kind, send, self.params.tasks))
                progress(f"{open_sessions} open, {kind:<7} {phase.rounds[-1].rate:7.0f} tasks/s")
        return phase

    def latencies(self, open_sessions: int) -> Latencies:
        lat = Latencies(open_sessions)
        created: list[Any] = []

        def plain() -> None:
            lat.plain_ms.append(1000 * timed(lambda: self.noop.delay().get(timeout=30)))

        def create() -> None:
            lat.create_ms.append(1000 * timed(lambda: created.append(self.create())))
            lat.complete_ms.append(1000 * timed(created.pop().complete))  # not in the figure

        for i in range(self.params.samples):
            for step in (plain, create) if i % 2 == 0 else (create, plain):
                step()
        return lat

    # -- the run ----------------------------------------------------------

    def run(self) -> Results:
        p = self.params
        started = time.perf_counter()
        progress("warming up")
        main = self.create()
        warm = max(50, p.tasks // 4)
        self.round("plain", self.noop.delay, warm)
        self.round("session", lambda: main.apply_async(self.noop), warm)
        for _ in range(10):
            self.noop.delay().get(timeout=30)
            self.create().complete()

        phase1 = self.phase(main, 1)
        progress("(b) round trips and creations")
        latency1 = self.latencies(1)

        progress(f"opening {p.sessions - 1} more sessions")
        others: list[Any] = []
        open_ms: list[float] = []
        open_started = time.perf_counter()
        for _ in range(p.sessions - 1):
            open_ms.append(1000 * timed(lambda: others.append(self.create())))
        open_s = time.perf_counter() - open_started

        try:
            phase2 = self.phase(main, p.sessions)
            progress(f"round trips and creations with {p.sessions} open")
            latency2 = self.latencies(p.sessions)
        finally:
            progress("completing sessions")
            for session in [main, *others]:
                session.complete()
        return Results(
            params=p,
            store=self.stack.store,
            phase1=phase1,
            phase2=phase2,
            latency1=latency1,
            latency2=latency2,
            open_s=open_s,
            open_ms=open_ms,
            wall_s=time.perf_counter() - started,
        )


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# -- report -------------------------------------------------------------------


def figures(r: Results) -> list[Figure]:
    p1, p2 = r.phase1, r.phase2
    return [
        Figure(
            "(a) session / plain task throughput",
            p1.median_rate("session") / p1.median_rate("plain"),
            0.97,
            higher=True,
        ),
        Figure(
            "(b) session creation p50 / plain round trip p50",
            median(r.latency1.create_ms) / median(r.latency1.plain_ms),
            1.5,
            higher=False,
        ),
        Figure(
            f"(c) session throughput, {r.params.sessions} open / 1 open",
            p2.median_rate("session") / p1.median_rate("session"),
            0.9,
            higher=True,
        ),
    ]


def print_report(r: Results) -> None:
    p = r.params
    print()
    print(
        f"sessionflow bench_sessions: Redis broker + result backend, {r.store} store, "
        f"1 prefork worker -c {p.concurrency}"
    )
    print(environment_line())
    print()
    print_figures(figures(r))
    print()
    print("raw numbers")
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
    print(f"  measured for {r.wall_s:.0f} s")


# -- command line ---------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=STORES, default="sqlite", help="session store")
    parser.add_argument("--quick", action="store_true", help="fewer tasks and samples (~1 min)")
    parser.add_argument("--tasks", type=int, help="tasks per throughput round")
    parser.add_argument("--rounds", type=int, help="rounds of each kind per phase")
    parser.add_argument("--samples", type=int, help="latency samples of each kind for (b)")
    parser.add_argument("--sessions", type=int, help="open sessions for (c) (default 1000)")
    parser.add_argument("--concurrency", type=int, help="worker pool processes (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep worker logs and SQLite file")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = params_from(args)
        check_services(args.store)
        with interrupts_as_keyboard_interrupt(), Stack(store=args.store, keep=args.keep) as stack:
            worker = stack.start_worker(
                "bench", concurrency=params.concurrency, max_sessions=params.sessions + 10
            )
            stack.wait_ready(worker)
            results = Bench(stack, worker, params).run()
    except BenchError as exc:
        print(f"bench_sessions: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_sessions: interrupted; workers stopped, scratch data removed", file=sys.stderr)
        return 130
    print_report(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(results), out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

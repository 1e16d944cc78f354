"""Placement cost and admission under contention, on four real workers, for each store.

Prints one table with a column per session store (see bench/README.md):

(i)  creation p50 with requires + constraints / creation p50 without, same workers  <= 1.2
     (and the p95 ratio, shown without a target)
(ii) sessions admitted per second: N client threads create and complete sessions with
     mixed ``requires`` on 4 workers that each declare 8 resource kinds; afterwards the
     store's session rows are replayed per worker: no capacity may ever be exceeded.

Run from the repository root::

    .venv/bin/python bench/bench_placement.py                   # SQLite, then PostgreSQL
    .venv/bin/python bench/bench_placement.py --stores sqlite --seconds 10

For each store it starts its own four ``celery worker`` processes on Redis, with their
own scratch store, queues and keys, and always stops them. The exit status is 0 whether
or not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from _common import (
    STORES,
    BenchError,
    Row,
    Stack,
    check_services,
    environment_line,
    interrupts_as_keyboard_interrupt,
    percentile,
    print_table,
)

from sessionflow import SessionCreationTimeout, SessionUnplaceable
from sessionflow.placement import mismatched

CREATION_TIMEOUT = 60.0
EXECUTION_TIMEOUT = 3600.0
MAX_SESSIONS = 6
TARGET_RATIO = 1.2

# Four workers, eight resource kinds each, with different capacities (and labels).
WORKERS: dict[str, tuple[str, str]] = {
    "pa": ("gpu=2,cpu=8,mem_gb=32,browser=4,licence=1,scratch=10,encoder=2,fpga=1", "zone=eu"),
    "pb": ("gpu=1,cpu=4,mem_gb=16,browser=8,licence=2,scratch=20,encoder=1,fpga=1", "zone=eu"),
    "pc": ("gpu=4,cpu=2,mem_gb=64,browser=2,licence=1,scratch=5,encoder=4,fpga=2", "zone=us"),
    "pd": ("gpu=1,cpu=16,mem_gb=8,browser=16,licence=3,scratch=40,encoder=1,fpga=1", "zone=us"),
}
TIERS = {"pa": 1, "pb": 2, "pc": 1, "pd": 3}  # a numeric label, for the ">=" constraint

# (i): one placed request every worker can take, against the same call without options.
PLACED = {"requires": {"cpu": 1}, "constraints": {"zone": ("in", ["eu", "us"])}}

# (ii): what the client threads ask for, picked at random.
MIX: list[dict[str, Any]] = [
    {"requires": {"gpu": 1}},
    {"requires": {"cpu": 2, "mem_gb": 4}},
    {"requires": {"browser": 2}},
    {"requires": {"licence": 1, "cpu": 1}},
    {"requires": {"gpu": 1, "encoder": 1}, "constraints": {"zone": "eu"}},
    {"requires": {"scratch": 5, "cpu": 1}, "constraints": {"tier": (">=", 2)}},
    {"requires": {"fpga": 1}},
    {"requires": {"mem_gb": 16}, "constraints": {"zone": ("in", ["eu", "us"])}},
    {"requires": {"gpu": 2, "mem_gb": 16, "cpu": 2}},
    {"requires": {"cpu": 1}, "prefer": [(5, {"zone": "us"})], "placement": "pack"},
]


@dataclass(frozen=True)
class Params:
    samples: int  # timed creations of each kind for (i)
    threads: int  # client threads for (ii)
    seconds: float  # how long the threads keep creating for (ii)
    hold: float  # most seconds a thread keeps its session open before completing it


DEFAULTS = Params(samples=100, threads=8, seconds=20.0, hold=0.05)


@dataclass
class Creation:
    """(i): creation latencies in milliseconds, interleaved plain/placed."""

    plain_ms: list[float] = field(default_factory=list)
    placed_ms: list[float] = field(default_factory=list)

    def ratio(self, q: float) -> float:
        return percentile(self.placed_ms, q) / percentile(self.plain_ms, q)


@dataclass
class Admission:
    """(ii): what the client threads made, and what the store says afterwards."""

    made: int = 0
    wall_s: float = 0.0
    create_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    unplaceable: int = 0
    errors: list[str] = field(default_factory=list)
    samples: int = 0  # reads of the workers' usage while the threads ran
    live_violations: list[str] = field(default_factory=list)
    replayed: int = 0  # session rows replayed afterwards
    violations: list[str] = field(default_factory=list)  # from the replay
    wrong_labels: list[str] = field(default_factory=list)
    peak: dict[str, dict[str, int]] = field(default_factory=dict)  # replayed, per worker
    capacity: dict[str, dict[str, int]] = field(default_factory=dict)
    per_worker: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.made / self.wall_s if self.wall_s else 0.0

    def full(self) -> int:
        """(worker, resource) pairs that were at their capacity at some moment."""
        return sum(
            self.peak[w].get(r, 0) == cap
            for w, caps in self.capacity.items()
            for r, cap in caps.items()
        )


@dataclass
class Results:
    store: str
    creation: Creation
    admission: Admission


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def create(flow: Any, **options: Any) -> Any:
    return flow.create_session(
        creation_timeout=CREATION_TIMEOUT, execution_timeout=EXECUTION_TIMEOUT, **options
    )


def wait_registered(flow: Any, nodenames: set[str], timeout: float = 30) -> None:
    """Until the store has every worker with its resources (placement reads them there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nodenames <= {w.nodename for w in flow.store.workers() if w.resources}:
            return
        time.sleep(0.1)
    raise BenchError(f"workers {sorted(nodenames)} not in the store after {timeout} s")


def measure_creation(flow: Any, samples: int) -> Creation:
    """Timed creations, plain and placed alternating (and which goes first); each
    session is completed right after, untimed."""
    out = Creation()
    kinds: tuple[tuple[list[float], Mapping[str, Any]], ...] = (
        (out.plain_ms, {}),
        (out.placed_ms, PLACED),
    )
    for i in range(samples):
        for into, options in kinds if i % 2 == 0 else kinds[::-1]:
            started = time.perf_counter()
            session = create(flow, **options)
            into.append(1000 * (time.perf_counter() - started))
            session.complete()
    return out


def measure_admission(flow: Any, params: Params, nodenames: set[str]) -> Admission:
    out = Admission()
    lock = threading.Lock()
    stop = threading.Event()
    started_at = flow.store.clock()

    def client(seed: int, until: float) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < until:
            ask = rnd.choice(MIX)
            try:
                t0 = time.perf_counter()
                session = create(flow, **ask)
                took = 1000 * (time.perf_counter() - t0)
            except SessionCreationTimeout:
                with lock:
                    out.timeouts += 1
                continue
            except SessionUnplaceable as exc:
                with lock:
                    out.unplaceable += 1
                    out.errors.append(str(exc))
                continue
            time.sleep(rnd.uniform(0, params.hold))
            session.complete()
            with lock:
                out.made += 1
                out.create_ms.append(took)

    def watch() -> None:  # the store's view of usage, as fast as it can be read
        while not stop.is_set():
            for w in flow.store.workers():
                if w.nodename not in nodenames:
                    continue
                capacity = {**w.resources, "sessions": w.max_sessions}
                for resource, amount in {**w.usage, "sessions": w.open_sessions}.items():
                    if amount > capacity.get(resource, 0):
                        out.live_violations.append(f"{w.nodename} {resource} {amount}")
            out.samples += 1

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.monotonic()
    until = began + params.seconds
    threads = [threading.Thread(target=client, args=(i, until)) for i in range(params.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    out.wall_s = time.monotonic() - began
    stop.set()
    watcher.join(10)
    replay(flow, nodenames, started_at, out)
    return out


def replay(flow: Any, nodenames: set[str], since: datetime, out: Admission) -> None:
    """Every session row since ``since``, per worker, in time order: what each held."""
    workers = {w.nodename: w for w in flow.store.workers() if w.nodename in nodenames}
    out.capacity = {n: {**w.resources, "sessions": w.max_sessions} for n, w in workers.items()}
    events: dict[str, list[tuple[datetime, int, dict[str, int]]]] = {n: [] for n in workers}
    for record in flow.store.list_sessions(created_after=since):
        if record.hostname not in workers or record.opened_at is None:
            continue
        out.replayed += 1
        out.per_worker[record.hostname] = out.per_worker.get(record.hostname, 0) + 1
        amounts = {**(record.requires or {}), "sessions": 1}
        if record.closed_at is None:
            out.violations.append(f"session {record.id} still open after the run")
            continue
        events[record.hostname] += [(record.opened_at, 1, amounts), (record.closed_at, 0, amounts)]
        bad = mismatched(workers[record.hostname].labels, record.constraints or {})
        if bad:
            out.wrong_labels.append(f"session {record.id} on {record.hostname}: {bad}")
    for nodename, timeline in events.items():
        held: dict[str, int] = {}
        peak = out.peak.setdefault(nodename, {})
        for at, opens, amounts in sorted(timeline, key=lambda e: (e[0], e[1])):  # ends first
            for resource, amount in amounts.items():
                held[resource] = held.get(resource, 0) + (amount if opens else -amount)
                peak[resource] = max(peak.get(resource, 0), held[resource])
                if held[resource] > out.capacity[nodename].get(resource, 0):
                    out.violations.append(
                        f"{nodename} {resource}: {held[resource]} held at {at.isoformat()}, "
                        f"capacity {out.capacity[nodename].get(resource, 0)}"
                    )


def run_store(store: str, params: Params) -> Results:
    with Stack(store=store) as stack:
        progress(f"[{store}] starting workers {', '.join(WORKERS)}")
        procs = [
            stack.start_worker(
                name,
                concurrency=1,
                max_sessions=MAX_SESSIONS,
                extra=(
                    *("--session-resources", resources),
                    *("--session-labels", f"{labels},tier={TIERS[name]}"),
                ),
            )
            for name, (resources, labels) in WORKERS.items()
        ]
        for proc in procs:
            stack.wait_ready(proc)
        flow = stack.flow
        nodenames = {p.nodename for p in procs}
        wait_registered(flow, nodenames)
        progress(f"[{store}] warming up")
        measure_creation(flow, 5)
        progress(f"[{store}] (i) {params.samples} creations of each kind")
        creation = measure_creation(flow, params.samples)
        progress(
            f"[{store}] (ii) {params.threads} threads for {params.seconds:g} s, mixed requires"
        )
        admission = measure_admission(flow, params, nodenames)
        progress(f"[{store}] {admission.made} sessions, {admission.rate:.1f}/s")
        return Results(store, creation, admission)


def table(results: Mapping[str, Results]) -> list[Row]:
    def each(fn: Callable[[Results], float]) -> dict[str, float]:
        return {store: fn(r) for store, r in results.items()}

    def ms(values: Sequence[float], q: float) -> float:
        return percentile(values, q) if values else float("nan")

    return [
        Row("(i) placement cost, same 4 workers"),
        Row(
            "creation p50 with requires+constraints ÷ without",
            each(lambda r: r.creation.ratio(50)),
            TARGET_RATIO,
        ),
        Row(
            "creation p95 with requires+constraints ÷ without", each(lambda r: r.creation.ratio(95))
        ),
        Row("  creation p50 without, ms", each(lambda r: ms(r.creation.plain_ms, 50)), digits=2),
        Row("  creation p50 with, ms", each(lambda r: ms(r.creation.placed_ms, 50)), digits=2),
        Row("  creation p95 without, ms", each(lambda r: ms(r.creation.plain_ms, 95)), digits=2),
        Row("  creation p95 with, ms", each(lambda r: ms(r.creation.placed_ms, 95)), digits=2),
        Row("(ii) admission, mixed requires, 4 workers x 8 resource kinds"),
        Row("sessions admitted per second", each(lambda r: r.admission.rate), digits=1),
        Row("  sessions created and completed", each(lambda r: r.admission.made), digits=0),
        Row(
            "  creation p50 under contention, ms",
            each(lambda r: ms(r.admission.create_ms, 50)),
            digits=1,
        ),
        Row(
            "  creation p95 under contention, ms",
            each(lambda r: ms(r.admission.create_ms, 95)),
            digits=1,
        ),
        Row(
            "  creation timeouts / unplaceable",
            each(lambda r: r.admission.timeouts + r.admission.unplaceable),
            digits=0,
        ),
        Row(
            "  (worker, resource) pairs that reached capacity",
            each(lambda r: r.admission.full()),
            digits=0,
        ),
        Row(
            "capacity exceeded, store replay afterwards",
            each(lambda r: len(r.admission.violations)),
            0,
            digits=0,
        ),
        Row(
            "capacity exceeded, store usage read during the run",
            each(lambda r: len(r.admission.live_violations)),
            0,
            digits=0,
        ),
        Row(
            "constraint not met by the admitting worker",
            each(lambda r: len(r.admission.wrong_labels)),
            0,
            digits=0,
        ),
    ]


def print_report(results: Mapping[str, Results], params: Params) -> None:
    print(f"\nbench_placement: {environment_line()}")
    print(
        f"4 workers (prefork -c 1, --max-sessions {MAX_SESSIONS}), Redis broker and results; "
        f"(i) {params.samples} creations of each kind; (ii) {params.threads} threads for "
        f"{params.seconds:g} s, sessions held 0-{1000 * params.hold:g} ms\n"
    )
    print_table(table(results), list(results))
    verdicts = ", ".join(
        f"{store} {'PASS' if r.creation.ratio(50) <= TARGET_RATIO else 'FAIL'}"
        for store, r in results.items()
    )
    print(f"\n(i) creation p50 ratio <= {TARGET_RATIO}: {verdicts}")
    for store, r in results.items():
        a = r.admission
        exceeded = len(a.violations) + len(a.live_violations)
        print(
            f"(ii) {store}: {a.replayed} session rows replayed, {a.samples} usage reads: "
            + ("no capacity exceeded" if not exceeded else f"{exceeded} CAPACITY EXCEEDED")
        )
        for nodename in sorted(a.capacity):
            caps = a.capacity[nodename]
            shown = " ".join(
                f"{k}={a.peak.get(nodename, {}).get(k, 0)}/{v}" for k, v in caps.items()
            )
            print(f"     {nodename}: {a.per_worker.get(nodename, 0)} sessions; peak {shown}")
        for line in itertools.islice(
            itertools.chain(a.violations, a.live_violations, a.wrong_labels, a.errors), 10
        ):
            print(f"     {line}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--stores",
        default=",".join(STORES),
        help=f"comma-separated session stores, one after the other (default {','.join(STORES)})",
    )
    parser.add_argument(
        "--samples", type=int, default=DEFAULTS.samples, help="(i) creations of each kind"
    )
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads, help="(ii) client threads")
    parser.add_argument(
        "--seconds", type=float, default=DEFAULTS.seconds, help="(ii) seconds of creating"
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=DEFAULTS.hold,
        help="(ii) most seconds a session stays open before it is completed",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    try:
        if not stores or any(s not in STORES for s in stores) or len(set(stores)) != len(stores):
            raise BenchError(f"--stores takes distinct names from {', '.join(STORES)}")
        if args.samples < 2 or args.threads < 1 or args.seconds <= 0 or args.hold < 0:
            raise BenchError("--samples >= 2, --threads >= 1, --seconds > 0, --hold >= 0")
        check_services(stores)
    except BenchError as exc:
        print(f"bench_placement: {exc}", file=sys.stderr)
        return 2
    params = Params(args.samples, args.threads, args.seconds, args.hold)
    results: dict[str, Results] = {}
    status = 0
    started = time.monotonic()
    try:
        with interrupts_as_keyboard_interrupt():
            for store in stores:
                results[store] = run_store(store, params)
    except BenchError as exc:
        print(f"bench_placement: {exc}", file=sys.stderr)
        status = 2
    except Exception:  # report the stores measured so far; the stack is cleaned up already
        traceback.print_exc()
        status = 1
    except KeyboardInterrupt:
        print(
            "bench_placement: interrupted; workers stopped, scratch data removed", file=sys.stderr
        )
        return 130
    if results:
        print_report(results, params)
        print(f"\n{time.monotonic() - started:.0f} s in all")
    return status


if __name__ == "__main__":
    sys.exit(main())

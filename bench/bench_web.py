"""A Django view that requests a session against one that only calls ``task.delay()``.

Acceptance item: a view calling ``flow.request_session(...)`` answers in at most twice
the time of a view calling ``some_task.delay(n)`` (p50). Both views answer JSON 202
and are driven in-process with ``django.test.Client`` (Django's WSGI handler),
interleaved, after a warm-up. No worker runs: ``request_session`` returns as soon as
the request is published (the pending row is written by a background thread).

Prints, per store: p50/p95 of each view and their ratios, the time of the call itself
inside the view, CPU per request (the calling thread, and the background threads per
session request), store statements per request (``_sqlcount``), and the first call in
a fresh process (a subprocess per view). Run from the repository root::

    .venv/bin/python bench/bench_web.py                    # SQLite, then PostgreSQL
    .venv/bin/python bench/bench_web.py --store sqlite --requests 500

Redis DB 15 (broker and results, every key under a per-run prefix; the others belong
to the examples, bench_sessions, Celery's suite and the tests), a scratch SQLite file
or a scratch schema in PostgreSQL's ``test`` database; all removed at the end. The exit status is 0
whether or not the target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _sqlcount
from _common import (
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    Row,
    environment_line,
    interrupts_as_keyboard_interrupt,
    median,
    percentile,
    print_table,
    service_up,
)
from django.http import HttpRequest, JsonResponse
from django.urls import path

REDIS_DB = 15  # free: 0/1 examples, 8/9 bench_sessions, 10/11 Celery's suite, 12-14 tests
PG_URL = f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/test"
TASK = "web.some_task"
TARGET = 2.0  # session view p50 / delay view p50
SESSION_OPTIONS = {"creation_timeout": 30, "execution_timeout": 60}
CALLER = threading.main_thread().name

# -- the Django side ---------------------------------------------------------------

_CTX: dict[str, Any] = {}  # the current store's flow and task, and the in-view call times


def delay_view(request: HttpRequest) -> JsonResponse:
    started = time.perf_counter()
    result = _CTX["task"].delay(7)
    _CTX["call_s"] = time.perf_counter() - started
    return JsonResponse({"task_id": result.id}, status=202)


def session_view(request: HttpRequest) -> JsonResponse:
    started = time.perf_counter()
    handle = _CTX["flow"].request_session(**SESSION_OPTIONS)
    _CTX["call_s"] = time.perf_counter() - started
    return JsonResponse({"session_id": handle.id}, status=202)


urlpatterns = [path("delay/", delay_view), path("session/", session_view)]
VIEWS = {"delay": "/delay/", "session": "/session/"}


def setup_django() -> Any:
    """Configure Django in this process (once) and return a test client."""
    import django
    from django.conf import settings
    from django.test import Client

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="bench-web-not-secret",
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            USE_TZ=True,
        )
        django.setup()
    return Client()


# -- the Celery side ----------------------------------------------------------------


def create_app(env: dict[str, str]) -> Any:
    """A Celery app with SessionFlow attached, from the settings ``Scratch`` made."""
    from celery import Celery

    from sessionflow import SessionFlow

    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    app = Celery("benchweb", set_as_current=False)
    app.conf.update(
        broker_url=redis_url,
        result_backend=redis_url,
        broker_transport_options={"global_keyprefix": env["keyprefix"]},
        result_backend_transport_options={"global_keyprefix": env["keyprefix"]},
        broker_connection_retry_on_startup=True,
        task_default_queue=f"{env['prefix']}.plain",
        sessionflow_database_url=env["url"],
        sessionflow_queue_prefix=env["prefix"],
        sessionflow_engine_options=json.loads(env["engine_options"]),
    )

    @app.task(name=TASK, shared=False)  # type: ignore[untyped-decorator]
    def some_task(n: int) -> int:
        return n

    SessionFlow(app)
    return app


@dataclass
class Scratch:
    """One store's Redis keys, store and app; ``close()`` removes all of them."""

    store: str  # "sqlite", "postgres" or a URL
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    env: dict[str, str] = field(default_factory=dict)
    app: Any = None
    tmp: Path | None = None
    pg_admin: str | None = None  # the conninfo the scratch schema lives in
    schema: str | None = None

    @property
    def label(self) -> str:
        return "sqlite" if self.env["url"].startswith("sqlite") else "postgres"

    def open(self) -> Scratch:
        self.env = {"prefix": f"sfweb-{self.run_id}", "keyprefix": f"sfweb-{self.run_id}:"}
        engine_options: dict[str, Any] = {}
        url = PG_URL if self.store == "postgres" else self.store
        if url == "sqlite":
            self.tmp = Path(tempfile.mkdtemp(prefix=f"sessionflow-web-{self.run_id}-"))
            url = f"sqlite:///{self.tmp / 'sessionflow.db'}"
        elif url.startswith("postgresql"):
            from sqlalchemy.engine import make_url

            self.pg_admin = make_url(url).set(drivername="postgresql").render_as_string(False)
            self.schema = f"sfweb_{self.run_id}"
            self._admin(f"CREATE SCHEMA {self.schema}")
            engine_options = {"connect_args": {"options": f"-csearch_path={self.schema}"}}
        self.env.update(url=url, engine_options=json.dumps(engine_options))
        self.app = create_app(self.env)
        self.flow.store.upgrade()
        return self

    @property
    def flow(self) -> Any:
        from sessionflow import SessionFlow

        return SessionFlow(self.app)

    def _admin(self, sql: str) -> None:
        import psycopg

        assert self.pg_admin is not None
        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(sql.encode())  # our own literal statements

    def close(self) -> None:
        """Stop the flow's threads, delete the run's Redis keys, drop the scratch store."""
        steps = []
        if self.app is not None:
            steps += [("closing the flow", self.flow.close), ("closing the app", self.app.close)]
        if self.env:
            steps.append(("deleting Redis keys", lambda: delete_keys(self.env["keyprefix"])))
        if self.schema:
            schema = self.schema
            steps.append(
                (f"dropping schema {schema}", lambda: self._admin(f"DROP SCHEMA {schema} CASCADE"))
            )
        if self.tmp:
            steps.append((f"removing {self.tmp}", lambda: shutil.rmtree(self.tmp or "")))
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                print(f"cleanup: {what} failed: {exc!r}", file=sys.stderr)
        self.app, self.env, self.schema, self.tmp = None, {}, None, None


def delete_keys(prefix: str) -> int:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


# -- measuring ----------------------------------------------------------------------


@dataclass
class Results:
    store: str
    requests: int
    counted: bool = True
    total_ms: dict[str, list[float]] = field(default_factory=dict)  # view -> per request
    call_ms: dict[str, list[float]] = field(default_factory=dict)  # the call inside the view
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # calling thread CPU
    process_cpu_s: float = 0.0  # the whole process over the timed loop
    counts: dict[str, int] = field(default_factory=dict)  # _sqlcount snapshot of the loop
    first: dict[str, dict[str, float]] = field(default_factory=dict)  # view -> child figures

    def p(self, view: str, q: float, which: str = "total_ms") -> float:
        return percentile(getattr(self, which)[view], q)

    @property
    def background_cpu_ms(self) -> float:
        """CPU of every other thread over the loop, per session request."""
        calling = sum(sum(v) for v in self.cpu_ms.values()) / 1000
        return 1000 * (self.process_cpu_s - calling) / self.requests


def drive(client: Any, view: str, results: Results | None) -> None:
    _sqlcount.set_phase(view)
    cpu0 = time.thread_time()
    started = time.perf_counter()
    response = client.post(VIEWS[view])
    total = time.perf_counter() - started
    cpu = time.thread_time() - cpu0
    _sqlcount.set_phase("-")
    if response.status_code != 202:
        raise RuntimeError(f"{VIEWS[view]} answered {response.status_code}: {response.content!r}")
    if results is not None:
        results.total_ms[view].append(1000 * total)
        results.call_ms[view].append(1000 * _CTX["call_s"])
        results.cpu_ms[view].append(1000 * cpu)


def wait_registered(flow: Any, timeout: float = 30) -> None:
    """Until the registrar wrote every pending row it was handed."""
    deadline = time.monotonic() + timeout
    while flow.registrar.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a flush that took its batch may still be writing it


def measure(scratch: Scratch, requests: int, warmup: int, count: bool) -> Results:
    client = setup_django()
    flow = scratch.flow
    _CTX.update(flow=flow, task=scratch.app.tasks[TASK])
    views = tuple(VIEWS)
    progress(f"[{scratch.label}] warming up: {warmup} requests of each view")
    for i in range(warmup):
        for view in views if i % 2 == 0 else views[::-1]:
            drive(client, view, None)
    wait_registered(flow)
    results = Results(scratch.label, requests, counted=count)
    for view in views:
        results.total_ms[view], results.call_ms[view], results.cpu_ms[view] = [], [], []
    progress(f"[{scratch.label}] {requests} requests of each view, interleaved")
    counts0 = _sqlcount.local_snapshot()
    cpu0 = time.process_time()
    for i in range(requests):
        for view in views if i % 2 == 0 else views[::-1]:
            drive(client, view, results)
    wait_registered(flow)
    results.process_cpu_s = time.process_time() - cpu0
    results.counts = (_sqlcount.local_snapshot() - counts0).as_dict()
    return results


def first_calls(scratch: Scratch, profile: bool) -> dict[str, dict[str, float]]:
    """Each view's first requests in a fresh process (one subprocess per view)."""
    out: dict[str, dict[str, float]] = {}
    for name, view, extra in (
        ("delay", "delay", []),
        ("session", "session", ["--profile"] if profile else []),
        ("session-opened", "session", ["--open-store", *(["--profile"] if profile else [])]),
    ):
        progress(f"[{scratch.label}] first {view} request in a fresh process ({name})")
        cmd = [sys.executable, __file__, "--child", view, "--child-env", json.dumps(scratch.env)]
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"first-call child ({name}) failed:\n{proc.stderr[-3000:]}")
        sys.stderr.write(proc.stderr)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def child(view: str, env: dict[str, str], profile: bool, open_store: bool) -> int:
    """In the subprocess: set up as a Django project would at import, then time requests.

    ``open_store``: touch ``flow.store`` during setup (as an ``AppConfig.ready`` could),
    so the first request does not import the SQL store.
    """
    started = time.perf_counter()
    client = setup_django()
    app = create_app(env)
    from sessionflow import SessionFlow

    flow = SessionFlow(app)
    if open_store:
        flow.store  # noqa: B018 - imports the SQL store; opens no connection
    _CTX.update(flow=flow, task=app.tasks[TASK])
    figures = {"setup_ms": 1000 * (time.perf_counter() - started)}
    for i in (1, 2, 3):
        profiler = cProfile.Profile() if profile and i == 1 else None
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        response = client.post(VIEWS[view])
        if profiler is not None:
            profiler.disable()
        figures[f"request{i}_ms"] = 1000 * (time.perf_counter() - t0)
        figures[f"call{i}_ms"] = 1000 * _CTX["call_s"]
        assert response.status_code == 202, response.content
        if profiler is not None:
            print(f"--- profile of the first {view} request (cumulative, top 40):", file=sys.stderr)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        if view == "session" and i == 1:
            # How long until the background thread's first write (engine, schema check,
            # insert) makes the pending row readable; polled from this thread.
            session_id = json.loads(response.content)["session_id"]
            while session_id not in flow.store.statuses([session_id]):
                time.sleep(0.002)
            figures["visible_ms"] = 1000 * (time.perf_counter() - t0)
    flow.close()
    app.close()
    print(json.dumps(figures))
    return 0


# -- report -------------------------------------------------------------------------


def table(results: dict[str, Results]) -> list[Row]:
    def each(fn: Any) -> dict[str, float | None]:
        return {s: fn(r) for s, r in results.items()}

    def stmts(r: Results, view: str, thread: str | None = CALLER) -> float | None:
        if not r.counted:
            return None
        snap = _sqlcount.Snapshot.from_dict(r.counts)
        return snap.total(role="client", thread=thread, phase=view) / r.requests

    def others(r: Results) -> float | None:
        if not r.counted:
            return None
        snap = _sqlcount.Snapshot.from_dict(r.counts)
        return (snap.total(role="client") - snap.total(role="client", thread=CALLER)) / r.requests

    def first(view: str, key: str) -> Any:
        return each(lambda r: r.first.get(view, {}).get(key))

    return [
        Row("whole request through django.test.Client, ms"),
        Row("  delay view p50", each(lambda r: r.p("delay", 50)), digits=3),
        Row("  session view p50", each(lambda r: r.p("session", 50)), digits=3),
        Row("  session / delay p50", each(lambda r: r.p("session", 50) / r.p("delay", 50)), TARGET),
        Row("  delay view p95", each(lambda r: r.p("delay", 95)), digits=3),
        Row("  session view p95", each(lambda r: r.p("session", 95)), digits=3),
        Row("  session / delay p95", each(lambda r: r.p("session", 95) / r.p("delay", 95))),
        Row("the call inside the view, p50 ms"),
        Row("  task.delay(n)", each(lambda r: r.p("delay", 50, "call_ms"))),
        Row("  flow.request_session(...)", each(lambda r: r.p("session", 50, "call_ms"))),
        Row(
            "  request_session / delay",
            each(lambda r: r.p("session", 50, "call_ms") / r.p("delay", 50, "call_ms")),
        ),
        Row("CPU per request, ms"),
        Row("  calling thread, delay view (median)", each(lambda r: median(r.cpu_ms["delay"]))),
        Row("  calling thread, session view (median)", each(lambda r: median(r.cpu_ms["session"]))),
        Row("  other threads, per session request", each(lambda r: r.background_cpu_ms)),
        Row("store statements per request"),
        Row("  delay view, calling thread", each(lambda r: stmts(r, "delay")), digits=2),
        Row("  session view, calling thread", each(lambda r: stmts(r, "session")), digits=2),
        Row("  other threads, per session request", each(others), digits=2),
        Row("first requests in a fresh process, ms"),
        Row("  setup at import (Django, app, SessionFlow)", first("delay", "setup_ms")),
        Row("  1st delay request", first("delay", "request1_ms")),
        Row("  ... of which task.delay()", first("delay", "call1_ms")),
        Row("  2nd delay request", first("delay", "request2_ms")),
        Row("  1st session request", first("session", "request1_ms")),
        Row("  ... of which request_session()", first("session", "call1_ms")),
        Row("  ... its pending row readable after", first("session", "visible_ms")),
        Row("  2nd session request", first("session", "request2_ms")),
        Row("  setup, flow.store touched at startup", first("session-opened", "setup_ms")),
        Row("  1st session request after that", first("session-opened", "request1_ms")),
        Row("  ... its pending row readable after", first("session-opened", "visible_ms")),
    ]


def print_report(results: dict[str, Results]) -> None:
    print()
    print(environment_line())
    some = next(iter(results.values()))
    print(
        f"{some.requests} requests of each view per store, interleaved, after a warm-up; "
        "no worker (request_session returns once the request is published)"
    )
    print()
    print_table(table(results), list(results))
    print()
    print("statements per session request by thread and kind (the timed loop):")
    for store, r in results.items():
        snap = _sqlcount.Snapshot.from_dict(r.counts)
        by: Counter[tuple[str, str, str]] = Counter()
        for (_, thread, phase, kind), n in snap.counts.items():
            by[(thread, phase, kind)] += n
        for (thread, phase, kind), n in sorted(by.items()):
            print(f"  {store:<8} {thread:<24} {phase:<8} {kind:<5} {n / r.requests:8.3f}")
    print()
    for store, r in results.items():
        ratio = r.p("session", 50) / r.p("delay", 50)
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print(
            f"{verdict} [{store}] session view p50 {r.p('session', 50):.3f} ms / delay view "
            f"p50 {r.p('delay', 50):.3f} ms = {ratio:.2f} (target <= {TARGET:g})"
        )


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per view")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per view")
    parser.add_argument(
        "--store",
        action="append",
        help=f"sqlite (a temp file), postgres ({PG_URL}), a sqlite:/// URL (used as it is) "
        "or a postgresql+psycopg:// URL (a scratch schema inside); repeat for several "
        "(default: sqlite and postgres)",
    )
    parser.add_argument("--no-count", action="store_true", help="do not count statements")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print cProfiles of the first session request in the fresh processes",
    )
    parser.add_argument("--child", choices=tuple(VIEWS), help=argparse.SUPPRESS)
    parser.add_argument("--child-env", help=argparse.SUPPRESS)
    parser.add_argument("--open-store", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.child_env), args.profile, args.open_store)
    stores = args.store or ["sqlite", "postgres"]
    needed = [("Redis", REDIS_HOST, REDIS_PORT)]
    if any(s == "postgres" or s.startswith("postgresql") for s in stores):
        needed.append(("PostgreSQL", PG_HOST, PG_PORT))
    missing = [f"{name} at {h}:{p}" for name, h, p in needed if not service_up(h, p)]
    if missing:
        print(f"bench_web: not reachable: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.no_count:
        _sqlcount.install("client")
    results: dict[str, Results] = {}
    status = 0
    try:
        with interrupts_as_keyboard_interrupt():
            for store in stores:
                scratch = Scratch(store)
                try:
                    scratch.open()
                    r = measure(scratch, args.requests, args.warmup, not args.no_count)
                    r.first = first_calls(scratch, args.profile)
                    results[r.store if r.store not in results else store] = r
                finally:
                    with contextlib.suppress(KeyboardInterrupt):
                        scratch.close()
    except KeyboardInterrupt:
        print("bench_web: interrupted; scratch data removed", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        status = 1
    if results:
        print_report(results)
    return status


if __name__ == "__main__":
    sys.exit(main())

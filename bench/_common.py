"""Helpers shared by the benchmarks: a scratch stack, worker processes, statistics, report.

A :class:`Stack` is one benchmark run's world: Redis broker and result backend
(DBs 8 and 9, every key under a per-run prefix), a scratch session store
(SQLite file or PostgreSQL database) and real ``celery worker`` processes.
Leaving its ``with`` block, normally or by error or Ctrl-C, stops the workers,
deletes the run's Redis keys and drops the scratch store.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
BROKER_DB, BACKEND_DB = 8, 9  # DBs 12 and 13 belong to the integration tests
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql://{PG_HOST}:{PG_PORT}/test"
HOSTNAME = socket.gethostname()
STORES = ("sqlite", "postgres")


class BenchError(Exception):
    """The benchmark cannot run here (a service is down, a worker did not start)."""


def service_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def check_services(stores: str | Sequence[str]) -> None:
    """Raise BenchError naming every service these stores need and cannot reach."""
    stores = [stores] if isinstance(stores, str) else list(stores)
    needed = [("Redis", REDIS_HOST, REDIS_PORT)]
    if "postgres" in stores:
        needed.append(("PostgreSQL", PG_HOST, PG_PORT))
    missing = [
        f"{name} at {host}:{port}" for name, host, port in needed if not service_up(host, port)
    ]
    if missing:
        raise BenchError(f"not reachable: {', '.join(missing)}; start it and run again")


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt so ``finally`` blocks clean up.

    SIGINT is handled explicitly too: a shell that starts us in the background makes
    Python ignore it otherwise.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- worker processes ---------------------------------------------------------


@dataclass
class WorkerProcess:
    """One ``celery worker`` subprocess, in its own process group."""

    name: str
    nodename: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_split(self) -> tuple[float, float]:
        """CPU time (user + system) so far of (the main process: event loop and threads,
        its pool processes); Linux only."""
        pool = sum(_process_cpu(pid) for pid in _children(self.popen.pid))
        return _process_cpu(self.popen.pid), pool

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown; SIGKILL the whole process group if it takes too long."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # stray pool processes, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def services_cpu() -> dict[str, float | None]:
    """CPU time so far of the PostgreSQL and Redis server processes on this machine
    (None: none found, e.g. a remote server). They share the CPUs with client and worker,
    so they bound throughput as much as either; Linux only."""
    found: dict[str, float | None] = {name: None for name in _SERVICES.values()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = _SERVICES.get((entry / "comm").read_text().strip())
        except OSError:
            continue
        if name is not None:
            found[name] = (found[name] or 0.0) + _process_cpu(int(entry.name))
    return found


_SERVICES = {"postgres": "postgres", "redis-server": "redis"}  # process name: label


def _process_cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"; utime, stime are 14, 15
    return (int(fields[11]) + int(fields[12])) / _TICKS


# -- the stack ----------------------------------------------------------------


@dataclass
class Stack:
    """Broker, result backend, scratch store and workers of one benchmark run."""

    store: str = "sqlite"
    keep: bool = False
    count: bool = False  # workers count their store statements into count_dir
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    root: Path = field(init=False)
    env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    app: Any = None
    _pg_db: str | None = None

    def __enter__(self) -> Stack:
        if self.store not in STORES:
            raise BenchError(f"unknown store {self.store!r}; use one of {STORES}")
        self.root = Path(tempfile.mkdtemp(prefix=f"sessionflow-bench-{self.run_id}-"))
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            for worker in self.workers:
                print(f"--- worker {worker.nodename} log:\n{worker.log_tail()}", file=sys.stderr)
        self.close()

    def _setup(self) -> None:
        env = {
            "SFB_QUEUE_PREFIX": f"sfbench-{self.run_id}",
            "SFB_KEYPREFIX": f"sfbench-{self.run_id}:",
            "SFB_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}",
            "SFB_RESULT_BACKEND": f"redis://{REDIS_HOST}:{REDIS_PORT}/{BACKEND_DB}",
        }
        if self.count:
            self.count_dir.mkdir()
            env["SFB_COUNT_DIR"] = str(self.count_dir)
        if self.store == "sqlite":
            env["SFB_DATABASE_URL"] = f"sqlite:///{self.root / 'sessionflow.db'}"
        else:
            self._pg_db = f"sfbench_{self.run_id}"
            _pg_admin(f"CREATE DATABASE {self._pg_db}")
            env["SFB_DATABASE_URL"] = f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/{self._pg_db}"
        self.env = env
        sys.path.insert(0, str(BENCH_DIR))
        from benchapp import create_app

        self.app = create_app(env)
        upgrade = getattr(self.flow.store, "upgrade", None)
        if upgrade is not None:
            upgrade()
        else:  # the documented command, should the library call move
            subprocess.run(
                [
                    str(Path(sys.executable).with_name("sessionflow")),
                    "db",
                    "upgrade",
                    "--url",
                    env["SFB_DATABASE_URL"],
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )

    @property
    def count_dir(self) -> Path:
        """Where the workers publish their statement counts (see ``_sqlcount``)."""
        return self.root / "counts"

    @property
    def flow(self) -> Any:
        from sessionflow import SessionFlow

        return SessionFlow(self.app)

    def task(self, name: str) -> Any:
        return self.app.tasks[name]

    def start_worker(
        self,
        name: str,
        *,
        concurrency: int,
        max_sessions: int,
        loglevel: str = "WARNING",
        extra: Sequence[str] = (),
    ) -> WorkerProcess:
        """Start ``celery -A benchapp worker -n NAME@%h -P prefork`` (does not wait)."""
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchapp",
            "worker",
            "-n",
            f"{name}@%h",
            "-P",
            "prefork",
            "-c",
            str(concurrency),
            "--max-sessions",
            str(max_sessions),
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *extra,
        ]
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
        )
        log_path = self.root / f"worker-{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in close()
            )
        worker = WorkerProcess(name, f"{name}@{HOSTNAME}", popen, log_path)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: WorkerProcess, timeout: float = 90) -> None:
        """Wait until the worker answers a remote-control ping."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not worker.alive():
                raise BenchError(f"worker {worker.nodename} exited:\n{worker.log_tail()}")
            if self.app.control.ping(destination=[worker.nodename], timeout=0.5):
                return
        raise BenchError(f"worker {worker.nodename} not ready after {timeout} s")

    def close(self) -> None:
        """Stop the workers, delete the run's Redis keys, drop the scratch store (idempotent).

        Every step runs even if an earlier one failed, and SIGINT/SIGTERM/SIGHUP wait
        until the end (a second Ctrl-C must not leave a database or a worker behind).
        """
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for worker in self.workers:
                _cleanup(f"stopping worker {worker.nodename}", worker.stop)
            self.workers = []
            if self.app is not None:
                # The client's liveness watcher thread must not outlive the store.
                with contextlib.suppress(Exception):
                    self.flow.close()
                with contextlib.suppress(Exception):
                    self.flow.store.dispose()
                with contextlib.suppress(Exception):
                    self.app.close()
                self.app = None
            if self.env:
                prefix = self.env["SFB_KEYPREFIX"]
                _cleanup(f"deleting Redis keys {prefix}*", lambda: _delete_redis_keys(prefix))
                self.env = {}
            if self._pg_db:
                name = self._pg_db
                _cleanup(
                    f"dropping database {name}",
                    lambda: _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                )
                self._pg_db = None
            if self.keep:
                print(
                    f"kept {self.root} (worker logs, SQLite store, statement counts)",
                    file=sys.stderr,
                )
            else:
                shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _cleanup(what: str, step: Callable[[], Any]) -> None:
    try:
        step()
    except Exception as exc:
        print(f"cleanup: {what} failed: {exc!r}", file=sys.stderr)


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.encode())  # our own literal statements


def _delete_redis_keys(prefix: str) -> None:
    import redis

    for db in (BROKER_DB, BACKEND_DB):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        finally:
            client.close()


# -- measuring ----------------------------------------------------------------


def open_session(store: Any, nodename: str, queue: str, execution_timeout: float = 3600.0) -> str:
    """A session opened on ``nodename`` straight in the store (no worker): its id."""
    from sessionflow.records import NewSession, utcnow

    session_id = str(uuid.uuid4())
    store.create_pending(NewSession(session_id, utcnow(), 5.0, execution_timeout))
    if store.admit(session_id, nodename, queue) is None:
        raise BenchError(f"the store did not open session {session_id}")
    return session_id


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_list(values: Sequence[float], digits: int = 0) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def environment_line() -> str:
    """Versions and machine load, printed with every report."""
    import celery
    import kombu
    import sqlalchemy

    import sessionflow

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    source = Path(sessionflow.__file__).parent
    return (
        f"python {platform.python_version()}, celery {celery.__version__}, "
        f"kombu {kombu.__version__}, sqlalchemy {sqlalchemy.__version__}; "
        f"{os.cpu_count()} CPUs, load average {load}; sessionflow from {source}"
    )


# -- report -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of a report table: a value per column (store) and an optional target.

    ``higher`` says which side of ``target`` passes. A row without values is a heading.
    """

    label: str
    values: Mapping[str, float | None] = field(default_factory=dict)
    target: float | None = None
    higher: bool = False
    digits: int = 3

    def passed(self, value: float) -> bool | None:
        if self.target is None:
            return None
        return value >= self.target if self.higher else value <= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.target == 0 and not self.higher:
            return "= 0"
        return f"{'>=' if self.higher else '<='} {self.target:g}"

    def cell(self, column: str) -> str:
        value = self.values.get(column)
        if value is None:
            return "n/a" if self.values else ""
        verdict = self.passed(value)
        digits = self.digits
        while digits < 6 and value != 0 and float(f"{value:.{digits}f}") in (0.0, self.target):
            digits += 1  # 0.0004 must not print as 0.000, nor 1.5004 as 1.500 MISS
        text = f"{value:.{digits}f}"
        return text if verdict is None else f"{text} {'pass' if verdict else 'MISS'}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "values": dict(self.values),
            "target": self.target_text or None,
            "passed": {c: self.passed(v) for c, v in self.values.items() if v is not None},
        }


def print_table(rows: Sequence[Row], columns: Sequence[str]) -> None:
    """Print ``rows`` with one value column per entry of ``columns``, then the target."""
    width = max(len(r.label) for r in rows)
    cells = {c: max([len(c), *(len(r.cell(c)) for r in rows)]) for c in columns}
    head = "  ".join(f"{c:<{cells[c]}}" for c in columns)
    print(f"{'figure':<{width}}  {head}  target")
    print(f"{'-' * width}  {'  '.join('-' * cells[c] for c in columns)}  ------")
    for r in rows:
        if not r.values and r.target is None:
            print(r.label)
            continue
        line = "  ".join(f"{r.cell(c):<{cells[c]}}" for c in columns)
        print(f"{r.label:<{width}}  {line}  {r.target_text}".rstrip())

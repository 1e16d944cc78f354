"""Count the store statements every process of a benchmark run executes.

One listener on SQLAlchemy's ``Engine`` *class* (``before_cursor_execute``) sees
every statement of every engine in the process, whoever created it; ``commit``
and ``rollback`` count transaction ends, and a ``checkout`` listener on the
``Pool`` class counts pre-ping checkouts. Counts are keyed by
``(role, thread name, phase, kind)``:

- role: ``client`` (the bench process), ``main`` (the worker's main process, where
  the event loop runs) or ``pool`` (a prefork pool process);
- thread: ``threading.current_thread().name``;
- phase: what the thread was doing, set by :func:`set_phase`. A pool process's
  main thread goes through ``before`` (Celery's trace function was entered: message
  decoded, tracer and any start gate running), ``prerun`` (``task_prerun`` fired;
  wrappers of ``task.run`` still run), ``return`` (the task's own code called
  :func:`body_reached`: its body ran, the result is being stored), ``after``
  (``task_postrun`` fired) and back to ``-`` when the trace function returns; any
  other thread stays at ``-``;
- kind: ``sql`` (a statement; an ``executemany`` counts once), ``txctl`` (a
  ``BEGIN``/``SAVEPOINT``/… sent as a statement, as the SQLite store does), ``tx``
  (a transaction ended: ``commit`` or ``rollback`` event), ``ping`` (a connection
  checkout from a pool with ``pool_pre_ping``: one extra round trip), ``drv`` (a
  statement as the DB-API driver saw it: psycopg's ``Cursor.execute``/``executemany``,
  or ``execute``/``executemany``/``executescript`` of a sqlite3 cursor).

``drv`` is the cross-check: every statement that goes through SQLAlchemy is also a
driver call, so ``drv - sql - txctl - ping`` counts statements that bypassed the
engine events (raw DB-API use), apart from a few per new connection (SQLite PRAGMAs
run in a ``connect`` hook, dialect initialisation).

Worker processes publish their counters to ``<dir>/<pid>.json`` (written to a temp
file, then ``os.replace``) every :data:`PUBLISH_INTERVAL` seconds from a daemon
thread and at exit; each file carries ``taken_at``, the wall time just before the
counters were copied, so a reader can wait until every live process has published
a snapshot taken after a given moment (:func:`read_dir`). A fork resets the
counters in the child (a pool process starts from zero) and restarts publishing.

What the driver sends by itself is not seen at all: psycopg's implicit ``BEGIN``,
``COMMIT``/``ROLLBACK`` (counted as ``tx``), libpq-level calls.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_DIR = "SFB_COUNT_DIR"  # set in a worker's environment: count and publish there
PUBLISH_INTERVAL = 0.2
KINDS = ("sql", "txctl", "tx", "ping", "drv")
_TXCTL = ("BEGIN", "SAVEPOINT", "RELEASE", "COMMIT", "ROLLBACK", "END")

Key = tuple[str, str, str, str]  # role, thread, phase, kind

_lock = threading.Lock()
_counts: dict[Key, int] = {}
_marks: dict[str, int] = {}
_local = threading.local()
_state: dict[str, Any] = {"role": "", "dir": None, "listening": False, "publisher_pid": 0}


# -- counting (every process) ---------------------------------------------------


def install(role: str, directory: str | Path | None = None) -> None:
    """Start counting in this process (idempotent); publish to ``directory`` if given."""
    _state["role"] = role
    if directory is not None:
        _state["dir"] = Path(directory)
        Path(directory).mkdir(parents=True, exist_ok=True)
    if not _state["listening"]:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        event.listen(Engine, "before_cursor_execute", _on_execute)
        event.listen(Engine, "commit", _on_tx_end)
        event.listen(Engine, "rollback", _on_tx_end)
        event.listen(Pool, "checkout", _on_checkout)
        _hook_drivers()
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(publish)
        _state["listening"] = True
    _start_publisher()


def set_role(role: str) -> None:
    _state["role"] = role


def set_phase(phase: str) -> None:
    """What the current thread is doing from now on (``-``: nothing in particular)."""
    _local.phase = phase


def mark(name: str) -> None:
    """Count an event (e.g. a trace started) next to the statements."""
    key = f"{_state['role']}:{name}"
    with _lock:
        _marks[key] = _marks.get(key, 0) + 1


def _add(kind: str) -> None:
    key = (_state["role"], threading.current_thread().name, getattr(_local, "phase", "-"), kind)
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1


def _on_execute(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    head = statement[:40].lstrip().upper()
    _add("txctl" if head.startswith(_TXCTL) else "sql")


def _on_tx_end(conn: Any) -> None:
    _add("tx")


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    if getattr(getattr(proxy, "_pool", None), "_pre_ping", False):
        _add("ping")


def _hook_drivers() -> None:
    """Count ``drv`` at the DB-API level: psycopg's cursor class, sqlite3's connect()."""
    try:
        import psycopg
    except ImportError:
        pass
    else:
        for cls in (psycopg.Cursor, psycopg.ServerCursor):
            for name in ("execute", "executemany"):
                method = cls.__dict__.get(name)
                if method is not None and not getattr(method, "_sfb_counted", False):
                    setattr(cls, name, _counted_call(method))
    import sqlite3
    import sqlite3.dbapi2

    connect = sqlite3.dbapi2.connect
    if not getattr(connect, "_sfb_counted", False):
        counted_connect = _sqlite_connect(connect)
        sqlite3.connect = sqlite3.dbapi2.connect = counted_connect


def _counted_call(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def counted(*args: Any, **kwargs: Any) -> Any:
        _add("drv")
        return method(*args, **kwargs)

    counted._sfb_counted = True  # type: ignore[attr-defined]
    return counted


def _sqlite_connect(connect: Callable[..., Any]) -> Callable[..., Any]:
    """sqlite3's classes are C types: count through a connection and cursor subclass."""
    import sqlite3

    class CountingCursor(sqlite3.Cursor):
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            _add("drv")
            return super().execute(*args, **kwargs)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            _add("drv")
            return super().executemany(*args, **kwargs)

        def executescript(self, *args: Any, **kwargs: Any) -> Any:
            _add("drv")
            return super().executescript(*args, **kwargs)

    class CountingConnection(sqlite3.Connection):
        def cursor(self, factory: Any = CountingCursor) -> Any:
            return super().cursor(factory)

        # These shortcuts run the statement in C, not through the cursor's methods.
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            _add("drv")
            return super().execute(*args, **kwargs)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            _add("drv")
            return super().executemany(*args, **kwargs)

        def executescript(self, *args: Any, **kwargs: Any) -> Any:
            _add("drv")
            return super().executescript(*args, **kwargs)

    @functools.wraps(connect)
    def counted_connect(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("factory", CountingConnection)
        return connect(*args, **kwargs)

    counted_connect._sfb_counted = True  # type: ignore[attr-defined]
    return counted_connect


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held the parent's at the fork
    _counts.clear()
    _marks.clear()
    _local.phase = "-"
    role = _state["role"]
    _state["role"] = "pool" if role == "main" else f"{role}-child"
    _state["publisher_pid"] = 0
    if _state["dir"] is not None:
        _start_publisher()


def local_snapshot() -> Snapshot:
    """This process's counters now."""
    with _lock:
        return Snapshot(Counter(_counts), Counter(_marks))


# -- pool-process hooks -------------------------------------------------------------


def wrap_trace_functions() -> None:
    """In a prefork pool process: mark the phase around Celery's trace functions.

    The worker's main process sends ``celery.app.trace.fast_trace_task`` (or
    ``trace_task_ret``) to the pool pickled by name, so replacing the module
    attribute in the pool process is what the pool process then calls. Never call
    this in the main process: pickling the original there would fail.
    """
    import celery.app.trace as trace

    for name in ("fast_trace_task", "trace_task_ret"):
        original = getattr(trace, name, None)
        if original is None or getattr(original, "_sfb_counted", False):
            continue
        setattr(trace, name, _phased(original))


def _phased(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        mark("trace")
        set_phase("before")
        try:
            return fn(*args, **kwargs)
        finally:
            set_phase("-")

    traced._sfb_counted = True  # type: ignore[attr-defined]
    return traced


def on_task_prerun(**_: Any) -> None:
    mark("prerun")
    set_phase("prerun")


def body_reached() -> None:
    """Called by the benchmark's task itself: its body starts (and, a no-op, ends) here."""
    mark("body")
    set_phase("return")


def on_task_postrun(**_: Any) -> None:
    mark("postrun")
    set_phase("after")


# -- publishing -----------------------------------------------------------------------


def _start_publisher() -> None:
    if _state["dir"] is None or _state["publisher_pid"] == os.getpid():
        return
    _state["publisher_pid"] = os.getpid()
    threading.Thread(target=_publish_forever, name="sfb-count-publisher", daemon=True).start()


def _publish_forever() -> None:
    pid = os.getpid()
    while _state["publisher_pid"] == pid:
        time.sleep(PUBLISH_INTERVAL)
        with contextlib.suppress(OSError):
            publish()


def publish() -> None:
    """Write this process's counters to ``<dir>/<pid>.json`` atomically."""
    directory: Path | None = _state["dir"]
    if directory is None:
        return
    taken_at = time.time()  # before the copy: every count made before this is in it
    with _lock:
        counts = [[*key, n] for key, n in _counts.items()]
        marks = dict(_marks)
    pid = os.getpid()
    payload = {
        "pid": pid,
        "role": _state["role"],
        "taken_at": taken_at,
        "counts": counts,
        "marks": marks,
    }
    tmp = directory / f".{pid}.json.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, directory / f"{pid}.json")


# -- reading (the bench process) ------------------------------------------------------


@dataclass
class Snapshot:
    """Counters summed over processes; subtract two to get what happened in between."""

    counts: Counter[Key] = field(default_factory=Counter)
    marks: Counter[str] = field(default_factory=Counter)

    def __add__(self, other: Snapshot) -> Snapshot:
        return Snapshot(self.counts + other.counts, self.marks + other.marks)

    def __sub__(self, other: Snapshot) -> Snapshot:
        counts = Counter(self.counts)
        counts.subtract(other.counts)
        marks = Counter(self.marks)
        marks.subtract(other.marks)
        return Snapshot(+counts, +marks)

    def total(
        self,
        kind: str = "sql",
        *,
        role: str | Iterable[str] | None = None,
        thread: str | None = None,
        phase: str | None = None,
    ) -> int:
        roles = {role} if isinstance(role, str) else set(role) if role is not None else None
        return sum(
            n
            for (r, t, p, k), n in self.counts.items()
            if k == kind
            and (roles is None or r in roles)
            and (thread is None or t == thread)
            and (phase is None or p == phase)
        )

    def as_dict(self) -> dict[str, int]:
        """``"role/thread/phase/kind": n``, for JSON output."""
        out = {"/".join(key): n for key, n in sorted(self.counts.items())}
        out.update({f"mark/{name}": n for name, n in sorted(self.marks.items())})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> Snapshot:
        snap = cls()
        for name, n in data.items():
            parts = name.split("/")
            if parts[0] == "mark":
                snap.marks["/".join(parts[1:])] += n
            else:
                role, phase, kind = parts[0], parts[-2], parts[-1]
                snap.counts[(role, "/".join(parts[1:-2]), phase, kind)] += n
        return snap


class StaleCounts(Exception):
    """A live process did not publish a fresh snapshot in time."""


def read_dir(directory: Path, not_before: float, timeout: float = 10.0) -> Snapshot:
    """Sum every process's published counters, once each live one is fresh.

    Waits until every file of a process that is still alive carries a snapshot
    taken at or after ``not_before`` (wall time); files of processes that have
    exited are used as they are (their last write, at exit when they exited cleanly).
    """
    deadline = time.monotonic() + timeout
    while True:
        snap, stale = Snapshot(), []
        for path in sorted(directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                stale.append(path.stem)  # being replaced; read again
                continue
            if data["taken_at"] < not_before and _alive(int(data["pid"])):
                stale.append(f"{data['role']} {data['pid']}")
                continue
            for role, thread, phase, kind, n in data["counts"]:
                snap.counts[(role, thread, phase, kind)] += n
            for name, n in data["marks"].items():
                snap.marks[name] += n
        if not stale:
            return snap
        if time.monotonic() >= deadline:
            raise StaleCounts(f"no fresh statement counts from {', '.join(stale)} in {directory}")
        time.sleep(PUBLISH_INTERVAL / 4)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

"""Group commit of task runs: one writer thread per worker, one statement per flush.

The worker main process sees every start and end of its pool's tasks (Celery's
pool callbacks); they are buffered here and written together every
``sessionflow_flush_interval`` seconds (default 0.1) or ``FLUSH_ROWS`` rows, as
River's completer, Hatchet's buffers and Graphile Worker's batches do. A start
is written only if the task is still running ``START_DELAY`` after it began, so a
short task costs one row.

What a SIGKILL between a task's end and the next flush (at most
the flush interval plus one write) loses: its run in the history (or the end of
it: the run then shows as ``LOST``). Its result is in the result backend
already and is never overwritten, so callers see it; the session's status and
``list_sessions`` are written synchronously and lose nothing.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection

from ..enums import RUN_STARTED
from ..errors import InvalidArgument, StoreRefused
from ..records import Run, utcnow
from ..store import SessionStore

logger = logging.getLogger("sessionflow.worker")
MAX_ROWS = 500  # rows in one statement
FLUSH_ROWS = 64  # this many ends waiting flush at once, whatever the interval
START_DELAY = 0.02  # seconds a run must last before its start is written on its own
BACKLOG = 100_000  # rows kept while the store is unreachable; older ones are dropped


def _same(run: Run) -> Run:
    return run


class Writer:
    """Buffers runs and writes them in batches from its own thread."""

    def __init__(self, store: SessionStore, interval: float = 0.1) -> None:
        self.store = store
        self.interval = interval
        self.dropped = 0  # rows lost to an outage longer than the backlog or refused (logged)
        self.flushes = 0
        self._lock = threading.Condition()
        self._ends: deque[Run] = deque()
        self._starts: dict[tuple[str, int], tuple[float, Callable[[], Run]]] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- feeding (event loop, pool callbacks) -------------------------------------------

    def started(self, key: tuple[str, int], make: Callable[[], Run]) -> None:
        """A run began; ``make()`` builds its record if it is still running at a flush."""
        with self._lock:
            self._starts[key] = (time.monotonic(), make)

    def claimed(self, session_id: str, task_ids: Collection[str], worker: str) -> None:
        """Tasks a pool process claimed whose start callback has not come yet (their
        session ended meanwhile): their start is written with the next flush, as attempt
        0, so a sweeper can judge them if this worker dies before that callback."""
        now = utcnow()
        with self._lock:
            known = {task_id for task_id, _ in self._starts}
            known.update(run.task_id for run in self._ends)
            for task_id in task_ids:
                if task_id not in known:
                    run = Run(task_id, 0, session_id, None, RUN_STARTED, worker, now, None)
                    self._starts[(task_id, 0)] = (time.monotonic(), functools.partial(_same, run))

    def finished(self, run: Run) -> None:
        with self._lock:
            self._starts.pop((run.task_id, run.attempt), None)
            self._ends.append(run)
            if len(self._ends) > BACKLOG:
                self._ends.popleft()
                self.dropped += 1
            if len(self._ends) >= FLUSH_ROWS:
                self._lock.notify()

    # -- writing ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="sessionflow-writer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        failing_since: float | None = None
        while not self._stop.is_set():
            with self._lock:
                self._lock.wait(self.interval)
            try:
                self.flush(include_young=False)
                failing_since = None
            except Exception as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    logger.warning("sessionflow: cannot write task runs yet: %s", exc)
                time.sleep(0.5)

    def flush(self, include_young: bool = True) -> None:
        """Write everything buffered now (``include_young``: also starts of tasks that
        began just now). Raises StoreError and keeps the rows when the store fails."""
        with self._flush_lock:
            with self._lock:
                batch = list(self._ends)[: MAX_ROWS * 4]
                now = time.monotonic()
                young = [
                    (key, make)
                    for key, (since, make) in self._starts.items()
                    if include_young or now - since >= START_DELAY
                ]
            starts = [make() for _, make in young]
            rows = batch + starts
            if not rows:
                return
            for first in range(0, len(rows), MAX_ROWS):
                self._write(rows[first : first + MAX_ROWS])
            with self._lock:
                for _ in range(len(batch)):
                    self._ends.popleft()
                for key, make in young:  # written; its end will update the same row
                    entry = self._starts.get(key)
                    if entry is not None and entry[1] is make:
                        del self._starts[key]
            self.flushes += 1

    def _write(self, rows: list[Run]) -> None:
        """One statement. If the store refuses it (a row it will never take, say of a
        session retention deleted while its task ran), row by row, and the refused rows
        are dropped: kept, they would fail every later flush. An outage raises (every
        row is kept; rows written already are written again, which changes nothing)."""
        try:
            self.store.record_runs(rows)
            return
        except (StoreRefused, InvalidArgument):
            pass
        refused: list[tuple[Run, Exception]] = []
        for row in rows:
            try:
                self.store.record_runs([row])
            except (StoreRefused, InvalidArgument) as exc:
                refused.append((row, exc))
        if refused:
            self._drop(refused)

    def _drop(self, refused: list[tuple[Run, Exception]]) -> None:
        self.dropped += len(refused)
        run, exc = refused[0]
        logger.error(
            "sessionflow: dropped %d task run(s) the store refused, e.g. %s[%s] of session %s: %s",
            len(refused),
            run.name,
            run.task_id,
            run.session_id,
            exc,
        )

    def stop(self) -> None:
        """Flush what is left and stop the thread."""
        self._stop.set()
        with self._lock:
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        try:
            self.flush()
        except Exception as exc:
            logger.error("sessionflow: %d task run(s) were not written: %s", len(self._ends), exc)

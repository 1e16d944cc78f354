"""Group commit of task registrations on the client side.

A single task sent through a session without ``max_turns`` is not registered
before it is sent: the worker's gate proves it genuine from its signature header,
and its registration (which lets a sweeper resolve it if its worker dies) is
buffered here and written by a background thread, one statement per session
every ``FLUSH_INTERVAL`` seconds — so sending costs no store round trip.

If the session ended before a registration reached the store, the dispatch is
refused and the tasks go to ``late_dispatch``: while the session is not settled
yet they are registered anyway and its settlement gives them their result (or
lets them run on); once it is settled, only the tasks it did not know — neither
registered nor running on the worker then — get their SessionClosed/SessionFailed
result here (a task that finished keeps its own). A task that started on the
worker before the end is never given a failure over the result it is about to
store; whatever the order of events, no caller waits forever. Canvases, sessions
with ``max_turns`` and tasks that need a branch snapshot are registered
synchronously, in one statement, before they are sent.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref

from .errors import SessionFlowError, ended_error
from .records import Dispatch, NewSession
from .results import Resolver
from .store import SessionStore

logger = logging.getLogger("sessionflow")
FLUSH_INTERVAL = 0.2  # seconds (a PostgreSQL row: ~60 us of CPU at 30 a statement, ~33 at 120)
_ALL: weakref.WeakSet[Registrar] = weakref.WeakSet()


class Registrar:
    """Buffers registrations of sent tasks and writes them from its own thread."""

    def __init__(self, store: SessionStore, resolver: Resolver) -> None:
        self.store = store
        self.resolver = resolver
        self._lock = threading.Condition()
        self._pending: dict[str, list[tuple[str, str | None]]] = {}
        self._sessions: list[NewSession] = []  # pending rows of requested sessions
        self._writing: set[str] = set()  # ids of those a flush is writing right now
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._stop = threading.Event()
        self.failures = 0
        _ALL.add(self)

    def add(self, session_id: str, tasks: tuple[tuple[str, str | None], ...]) -> None:
        with self._lock:
            self._pending.setdefault(session_id, []).extend(tasks)
        self._ensure_thread()

    def has_session(self, session_id: str) -> bool:
        """Whether the pending row of this requested session is still to be written (or
        being written now: ``flush()`` then waits for that write)."""
        with self._lock:
            return session_id in self._writing or any(n.id == session_id for n in self._sessions)

    def add_pending(self, new: NewSession) -> None:
        """Write the pending row of a requested session (``flow.request_session``)."""
        with self._lock:
            self._sessions.append(new)
        self._ensure_thread()

    def discard(self, session_id: str, task_ids: set[str]) -> None:
        """Forget tasks whose message could not be sent."""
        with self._lock:
            kept = [t for t in self._pending.get(session_id, []) if t[0] not in task_ids]
            if kept:
                self._pending[session_id] = kept
            else:
                self._pending.pop(session_id, None)

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._pid == pid and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid == pid and self._thread is not None and self._thread.is_alive():
                return
            self._pid = pid
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, name="sessionflow-registrar", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except SessionFlowError as exc:  # the store is away: keep the rows, retry
                logger.warning("sessionflow: cannot register sent tasks yet: %s", exc)
                self._stop.wait(0.5)
            except Exception:
                logger.exception("sessionflow: registering sent tasks failed")

    def flush(self, session_id: str | None = None) -> None:
        """Write what is buffered (for one session, or all); raises StoreError and keeps
        the rows if the store fails."""
        with self._flushing:
            with self._lock:
                sessions, self._sessions = self._sessions, []
                self._writing = {new.id for new in sessions}
            try:
                for new in sessions:  # rows of sessions asked for come first
                    self.store.create_pending(new)
            except BaseException:
                with self._lock:
                    self._sessions[:0] = sessions[sessions.index(new) :]
                raise
            finally:
                with self._lock:
                    self._writing = set()
            with self._lock:
                ids = [session_id] if session_id is not None else list(self._pending)
                batches = {sid: list(self._pending.get(sid, ())) for sid in ids}
            for sid, tasks in batches.items():
                if not tasks:
                    continue
                queue = self.store.dispatch(Dispatch(sid, tuple(tasks)))
                with self._lock:
                    rest = self._pending.get(sid, [])[len(tasks) :]
                    if rest:
                        self._pending[sid] = rest
                    else:
                        self._pending.pop(sid, None)
                if queue is None:
                    self._refused(Dispatch(sid, tuple(tasks)))

    def _refused(self, dispatch: Dispatch) -> None:
        """The session ended before these registrations arrived. Those its settlement
        will see, or saw running, get their result from there; the others get it here."""
        session_id = dispatch.session_id
        task_ids = self.store.late_dispatch(dispatch)
        if not task_ids:
            return
        found = self.store.statuses([session_id]).get(session_id)
        status, reason = (found[0].value, found[1]) if found else (None, None)
        self.resolver.store_failures(task_ids, ended_error(session_id, status, reason))

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        try:
            self.flush()
        except Exception as exc:
            logger.error("sessionflow: %d registrations not written: %s", self.pending(), exc)

    def pending(self) -> int:
        with self._lock:
            return sum(len(tasks) for tasks in self._pending.values()) + len(self._sessions)


@atexit.register
def _flush_all() -> None:  # a client that exits right after sending still registers
    for registrar in list(_ALL):
        if registrar._pid == os.getpid():
            registrar.close()


__all__ = ["FLUSH_INTERVAL", "Registrar"]

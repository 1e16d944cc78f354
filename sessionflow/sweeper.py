"""Sessions of workers that went silent: failed, kept for a restart, or moved.

Liveness lives in the store: workers stamp a heartbeat every
``sessionflow_heartbeat_interval``. One process of the cluster at a time — the
holder of the ``sweeper`` lease, a worker's ticker or a client's watcher thread —
judges silent workers, so detection works with no other worker alive and two
sweepers never drain the same queue at once. Its work runs in a thread, never on
a worker's event loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from kombu.entity import Queue

from .canvas import make_queue
from .config import Config
from .enums import Reason, SessionStatus, WorkerStatus
from .errors import SessionFlowError
from .placement import placed
from .queues import Queues
from .records import Ended, SessionRecord, utcnow
from .results import Resolver
from .retention import prune as retention_prune
from .store import SessionStore

logger = logging.getLogger("sessionflow")
LEASE = "sweeper"
# A task registered this recently may still be on its way to the broker.
DISPATCH_GRACE = timedelta(seconds=1)
RETENTION_EVERY = 30.0  # seconds between retention passes of the lease holder


def holder_id() -> str:
    """A name for this process in the lease table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Sweeper:
    """Judges silent workers while it holds the cluster's ``sweeper`` lease."""

    def __init__(
        self,
        store: SessionStore,
        queues: Queues,
        resolver: Resolver,
        config: Config,
        request_admission: Callable[..., None],
        holder: str | None = None,
        place_move: Callable[[SessionRecord], str | None] | None = None,
    ) -> None:
        self.store = store
        self.queues = queues
        self.resolver = resolver
        self.config = config
        self.request_admission = request_admission
        self.holder = holder or holder_id()
        # Moving sessions that asked for placement are offered to the best live worker
        # (``place_move``: None when asked, else why none could ever take it), again
        # every ``MOVE_RETRY`` s until one takes it or ``creation_timeout`` passes.
        self.place_move = place_move
        self._move_asked: dict[str, float] = {}
        self._healthy_since: float | None = None
        self._last_retention = float("-inf")  # the first pass comes with the first sweep

    @property
    def lease_ttl(self) -> float:
        # Short: a dead holder blocks sweeping until its lease runs out.
        return 2.5 * max(self.config.heartbeat_interval, self.config.monitor_interval)

    def tick(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Sweep if this process holds (or can take) the lease, and apply retention when
        it is due (``stop``: the process is stopping, cut a retention pass short); True
        if it swept."""
        try:
            if not self.store.take_lease(LEASE, self.holder, self.lease_ttl):
                self._mark_healthy()  # the store answered: its heartbeats are current
                return False
            self.sweep()
            self.retain(stop)
        except SessionFlowError:
            self._healthy_since = None
            raise
        return True

    def retain(self, stop: Callable[[], bool]) -> None:
        """Every ``RETENTION_EVERY`` s: ended sessions past retention are deleted and
        histories trimmed (whichever process holds the lease: a web process's watcher
        keeps it as long as it lives)."""
        if time.monotonic() - self._last_retention < RETENTION_EVERY:
            return
        self._last_retention = time.monotonic()
        pruned = retention_prune(
            self.store, self.config.retention, self.config.history_max_runs, stop=stop
        )
        if pruned.sessions:
            logger.info("sessionflow: retention deleted %d ended sessions", pruned.sessions)

    def _mark_healthy(self) -> float:
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        return self._healthy_since

    def still_holding(self) -> bool:
        """Fencing: work that another sweeper could undo checks this first."""
        return self.store.holds_lease(LEASE, self.holder)

    def sweep(self) -> None:
        store = self.store
        silent = store.silent_workers(min_age=2 * self.config.heartbeat_interval)
        # After a store outage every heartbeat looks old until workers write again:
        # judge only after the store has answered this process for a whole timeout.
        watched = time.monotonic() - self._mark_healthy()
        for nodename, age, status in silent:
            self._judge(nodename, age, status, watched)
        for new in store.stale_pending():  # asked for (request_session), never admitted
            if store.abandon_new(new, Reason.CREATION_TIMEOUT.value):
                logger.info("sessionflow: no worker admitted session %s in time", new.id)
        for session_id in store.stalled_moves():
            self._fail_move(session_id)
        self._offer_moves()

    def _fail_move(self, session_id: str, why: str | None = None) -> None:
        if self.end_move(session_id, SessionStatus.FAILED, Reason.WORKER_LOST.value):
            logger.warning(
                "sessionflow: no worker took over session %s%s",
                session_id,
                f": {why}" if why else "",
            )

    def end_move(self, session_id: str, status: SessionStatus, reason: str) -> bool:
        """End a session that waits for a new worker (no worker took it over, or its
        caller completed it): its parked tasks are dropped, every unfinished task is
        resolved, a run left on the dead worker is lost. False if it is not pending any
        more (a worker took it over meanwhile, or it ended); callers pass moving ones."""
        if not self.store.end_session(
            session_id, status, reason, from_states=(SessionStatus.PENDING,)
        ):
            return False
        self._settle(session_id, lose_started=True)
        self.queues.drop_parked(session_id)
        return True

    def _place(self, record: SessionRecord) -> None:
        """Ask for a worker to take over a moving session: any with room (the shared
        queue), or, if it asked for placement, the best live one by the same rules as
        at creation; a session no live worker could ever take fails at once."""
        if self.place_move is None or not placed(record):
            self.request_admission(record.id, move=True)
            return
        self._move_asked[record.id] = time.monotonic()
        why = self.place_move(record)
        if why is not None:
            self._fail_move(record.id, why)

    def _offer_moves(self) -> None:
        """Ask again for placed moving sessions no worker has taken yet (it was full)."""
        if self.place_move is None:
            return
        moving = [record for record in self.store.moving() if placed(record)]
        ids = {record.id for record in moving}
        self._move_asked = {k: v for k, v in self._move_asked.items() if k in ids}
        retry = 2 * self.config.heartbeat_interval
        for record in moving:
            if time.monotonic() - self._move_asked.get(record.id, -retry) >= retry:
                self._place(record)

    def _judge(self, nodename: str, age: float, status: WorkerStatus, watched: float) -> None:
        store = self.store
        reason = (
            Reason.WORKER_SHUTDOWN.value
            if status is WorkerStatus.OFFLINE
            else Reason.WORKER_LOST.value
        )
        moving: list[SessionRecord] = []
        for record in store.open_sessions(nodename):
            if age <= record.heartbeat_timeout or watched < record.heartbeat_timeout:
                continue
            if record.affinity == "soft":
                ended = store.begin_move(record.id, nodename)
                if ended is None:
                    continue
                moving.append(record)
                self.resolver.resolve(ended)
                verb = "moves to another worker"
            elif store.end_session(record.id, SessionStatus.FAILED, reason, hostname=nodename):
                self._settle(record.id, lose_started=True)
                verb = "failed"
            else:
                continue
            logger.warning(
                "sessionflow: session %s %s: %s (%s silent for %.1f s)",
                record.id,
                verb,
                reason,
                nodename,
                age,
            )
        for session_id, _ in store.unsettled(nodename):
            found = store.get_session(session_id)
            if found is None or age <= found.heartbeat_timeout:
                continue
            if watched >= found.heartbeat_timeout:
                self._settle(session_id, lose_started=True)
        # Runs still unfinished on it, of sessions it had ended and settled already (a
        # worker killed while it finished its tasks after a warm shutdown): lost too.
        for ended in store.lose_interrupted(nodename, silent_for=min(age, watched), reason=reason):
            logger.warning(
                "sessionflow: %d task(s) of session %s were running on %s, silent for %.1f s: lost",
                len(ended.lost),
                ended.session_id,
                nodename,
                age,
            )
            self.resolver.resolve(ended)
        if moving or not store.open_sessions(nodename):
            self.drain(nodename, utcnow() - DISPATCH_GRACE, moved=[r.id for r in moving])
        for record in moving:
            self._place(record)

    def _settle(self, session_id: str, *, lose_started: bool) -> None:
        ended = self.store.settle(session_id, lose_started=lose_started)
        if ended is not None:
            self.resolver.resolve(ended)

    def drain(
        self, nodename: str, silent_since: datetime | None = None, moved: Collection[str] = ()
    ) -> None:
        """Empty a gone worker's session queue.

        Tasks of sessions that are moving are parked until their new worker takes
        them; tasks of sessions still waiting for a restart stay; the rest (their
        sessions have ended, their results are stored) are dropped. Tasks of the
        sessions this sweep ``moved`` that are nowhere (a transport that lost what
        the dead worker had prefetched) are resolved as lost. A session moved
        earlier is left alone: its tasks may be parked already, or in the hands of
        another sweeper.
        """
        statuses: dict[str | None, tuple[SessionStatus, str | None] | None] = {}
        own = make_queue(self.config.worker_queue(nodename))

        def destination(session_id: str | None) -> Queue | None:
            if session_id not in statuses:
                found = self.store.statuses([session_id]) if session_id else {}
                statuses[session_id] = found.get(session_id) if session_id else None
            known = statuses[session_id]
            if known is None:
                return None
            status, reason = known
            if status is SessionStatus.PENDING and reason == Reason.MOVING.value:
                assert session_id is not None
                return self.queues.parking_queue(session_id)
            return own if status is SessionStatus.OPEN else None

        try:
            seen = self.queues.sort(own.name, destination)
        except Exception:
            logger.exception("sessionflow: could not drain the queue of %s", nodename)
            return
        for session_id in moved:
            self.resolve_missing(session_id, seen, silent_since)

    def resolve_missing(self, session_id: str, seen: set[str], before: datetime | None) -> None:
        """Tasks of a session dispatched before ``before`` that are in no queue were lost
        with a worker's prefetched messages: resolve them (only while holding the lease,
        so a sweeper never marks lost what another one has just parked)."""
        if before is None or not self.still_holding():
            return
        ended = self.store.lose_missing(session_id, seen, before)
        if ended is not None:
            logger.warning(
                "sessionflow: %d queued task(s) of %s were lost with their worker",
                len(ended.lost),
                session_id,
            )
            self.resolver.resolve(ended)


class Watcher:
    """A daemon thread that runs :meth:`Sweeper.tick` in a client process."""

    def __init__(self, sweeper: Sweeper, interval: float) -> None:
        self.sweeper = sweeper
        self.interval = interval
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._stop = threading.Event()

    def ensure(self) -> None:
        with self._lock:
            pid = os.getpid()
            if self._thread is not None and self._pid == pid and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="sessionflow-watch", daemon=True)
            self._pid = pid
            self._thread.start()

    def _run(self) -> None:
        quiet_until = 0.0
        while not self._stop.wait(self.interval):
            try:
                self.sweeper.tick()
                quiet_until = 0.0
            except Exception as exc:
                if time.monotonic() >= quiet_until:  # one line a minute while it lasts
                    logger.warning("sessionflow: liveness check failed: %s", exc)
                    quiet_until = time.monotonic() + 60

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._thread = None


__all__ = ["DISPATCH_GRACE", "Ended", "Sweeper", "Watcher"]

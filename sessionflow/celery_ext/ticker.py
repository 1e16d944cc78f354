"""The worker's periodic work, in its own thread: nothing slow runs on the event loop.

Every ``sessionflow_heartbeat_interval``, in this order:

1. sync: one query for the ids the store holds open on this worker (and the status
   of any held session missing from them); sessions ended elsewhere (``complete()``
   whose reply got lost, an operator) are settled here, as their owner;
2. expiry: execution_timeout, ttl and idle_timeout, judged from memory;
3. heartbeat, stamped with the time *before* the sync, so a client that sees a
   heartbeat later than an end knows this worker has applied that end (after a
   warm shutdown only heartbeats go on, until the pool has finished its tasks);
4. sweep (only the holder of the cluster's ``sweeper`` lease) and, now and
   then, retention.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..enums import Reason, SessionStatus
from ..errors import SessionFlowError
from ..records import utcnow

if TYPE_CHECKING:
    from ..flow import SessionFlow
    from .live import LiveSessions

logger = logging.getLogger("sessionflow.worker")


class Ticker:
    """Heartbeats, sync with the store, expiry, sweeping and retention for one worker."""

    def __init__(self, flow: SessionFlow, live: LiveSessions) -> None:
        self.flow = flow
        self.live = live
        self.interval = flow.config.heartbeat_interval
        self._stop = threading.Event()
        self._shutdown = threading.Event()
        self._shutdown_done = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet_until = 0.0
        self._adopting: set[str] = set()
        self._wake = threading.Event()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="sessionflow-ticker", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._shutdown.is_set():
                self._end_for_shutdown()
                self._finish()
                return
            self.tick()
            self._wake.wait(self.interval)
            self._wake.clear()

    def _finish(self) -> None:
        """After a warm shutdown ended the sessions: heartbeats only (the worker stays
        offline) while the pool finishes its running tasks, until ``stop()``. A sweeper
        judges the runs still unfinished only once they stop (the process was killed)."""
        while not self._stop.wait(self.interval):
            try:
                self.flow.store.heartbeat(self.live.nodename, online=False)
            except SessionFlowError as exc:
                self._warn(f"sessionflow: {exc}")
            except Exception:
                logger.exception("sessionflow: heartbeat failed")

    def wake(self) -> None:
        self._wake.set()

    def adopt(self, session_id: str) -> None:
        """A moved session was admitted here: bring its parked tasks (soon, off the loop)."""
        self._adopting.add(session_id)
        self.wake()

    def tick(self) -> None:
        for step in (self.adopt_parked, self.sync_and_beat, self.sweep):
            try:
                step()
            except SessionFlowError as exc:
                self._warn(f"sessionflow: {exc}")
            except Exception:
                logger.exception("sessionflow: periodic check failed")

    def _warn(self, message: str) -> None:
        if time.monotonic() >= self._quiet_until:  # one line a minute while it lasts
            logger.warning(message)
            self._quiet_until = time.monotonic() + 60

    # -- the steps -----------------------------------------------------------------------

    def adopt_parked(self) -> None:
        """Bring the parked tasks of moved sessions here; retried until it works."""
        for session_id in sorted(self._adopting):
            try:
                moved = self.flow.queues.adopt(session_id, self.live.queue)
            except Exception as exc:
                self._warn(f"sessionflow: could not take over the tasks of {session_id}: {exc}")
                continue
            self._adopting.discard(session_id)
            logger.warning(
                "sessionflow: took over session %s with %d queued tasks", session_id, moved
            )

    def sync_and_beat(self) -> None:
        store, live = self.flow.store, self.live
        before = store.clock()
        held = live.ids()
        # Only what the store no longer has open here needs a closer look (one cheap
        # query a tick: binding every held id into statuses() cost 5x as much).
        gone = set(held) - store.open_ids(live.nodename) if held else set()
        statuses = store.statuses(gone) if gone else {}
        for session_id in sorted(gone):
            found = statuses.get(session_id)
            if found is None or found[0] is not SessionStatus.OPEN:
                live.end(session_id)  # ended (or deleted) elsewhere: settle it as its owner
        self.expire()
        store.heartbeat(
            live.nodename,
            at=before,
            max_sessions=live.cap,
            resources=live.resources,
            labels=live.labels,
        )

    def expire(self) -> None:
        """Close sessions past execution_timeout, ttl or idle_timeout (from memory)."""
        now, mono = utcnow(), time.monotonic()
        for live in self.live.snapshot():
            record = live.record
            reason = None
            if record.deadline_at is not None and record.deadline_at <= now:
                reason = Reason.EXECUTION_TIMEOUT
            elif record.expires_at is not None and record.expires_at <= now:
                reason = Reason.TTL
            elif (
                record.idle_timeout is not None
                and not live.running
                and not live.queued
                and mono - live.last_activity >= record.idle_timeout
            ):
                reason = Reason.IDLE_TIMEOUT
            if reason is None:
                continue
            if self.flow.store.end_session(
                record.id, SessionStatus.CLOSED, reason.value, hostname=self.live.nodename
            ):
                logger.info("sessionflow: session %s closed: %s", record.id, reason.value)
            self.live.end(record.id)

    def sweep(self) -> None:
        self.flow.sweeper.tick(stop=self._stop.is_set)  # retention too, when it is due

    # -- shutdown -------------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Warm shutdown began (called from the signal handler): end sessions soon."""
        self._shutdown.set()
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            threading.Thread(
                target=self._end_for_shutdown, name="sessionflow-stop", daemon=True
            ).start()

    def _end_for_shutdown(self) -> None:
        if self._shutdown_done.is_set():
            return
        try:
            store = self.flow.store
            for live in self.live.snapshot():
                if live.record.survive_restart:
                    continue  # failed later by a sweep unless the worker is back in time
                if store.end_session(
                    live.record.id,
                    SessionStatus.FAILED,
                    Reason.WORKER_SHUTDOWN.value,
                    hostname=self.live.nodename,
                ):
                    logger.info("sessionflow: session %s failed: worker_shutdown", live.record.id)
                self.live.end(live.record.id)
            store.worker_offline(self.live.nodename)
        except Exception:
            logger.exception("sessionflow: could not end the sessions of %s", self.live.nodename)
        finally:
            self._shutdown_done.set()

    def wait_shutdown(self, timeout: float) -> bool:
        return self._shutdown_done.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)


__all__ = ["Ticker"]

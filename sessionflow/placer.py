"""Placing sessions that ask for resources or labels: the client's side of admission.

A session created with ``requires``, ``constraints``, ``prefer`` or ``placement``
does not go to the shared creation queue. The client reads the live workers
(capacities, labels, usage: one query, trusted for ``VIEW_TTL``), ranks them
(:func:`sessionflow.placement.rank`) and sends the request, which carries the
whole session, to the best one's own creation queue. That worker judges it
against its live view, on its event loop, one request at a time, and answers
through the result backend: admitted, ``busy`` or ``mismatch`` (its view was
newer than ours); the client then tries the next worker at once. A worker that
does not answer within ``ATTEMPT_TIMEOUT`` (busy elsewhere, or paused at its cap)
is skipped until its answer comes in late or ``REASK_AFTER`` passes; then it is
asked again. When every worker that could take it is full, the client re-reads
the workers every 0.02 s growing to 0.2 s, so a session that ends or a worker
that joins is seen, until ``creation_timeout``.

No worker is ever over a capacity, because only a worker admits sessions onto
itself. A request may reach two workers (one was slow to answer, the client
moved on): the store lets exactly one insert of the session happen, and the
client that gives up inserts it as failed, so a late admission never opens a
session nobody waits for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeout

from .canvas import make_queue
from .enums import Reason, SessionStatus, WorkerStatus
from .errors import SessionCreationTimeout, SessionFlowError, SessionUnplaceable
from .placement import Needs, Offer, describe, explain_busy, explain_unplaceable, rank
from .records import NewSession, SessionRecord
from .resources import SESSIONS

if TYPE_CHECKING:
    from .flow import SessionFlow

logger = logging.getLogger("sessionflow")
ATTEMPT_TIMEOUT = 1.0  # seconds to wait for one worker's answer before trying the next
REASK_AFTER = 5.0  # seconds before a worker that never answered is asked again
VIEW_TTL = 0.25  # seconds a process trusts its last read of the workers for ranking
_POLL_START, _POLL_MAX = 0.02, 0.2


class Placer:
    """Ranks live workers for placed sessions and asks them in turn (one per app)."""

    def __init__(self, flow: SessionFlow) -> None:
        self.flow = flow
        self._lock = threading.Lock()
        self._view: tuple[float, list[Offer]] | None = None

    # -- the workers, as the store has them ---------------------------------------------

    def offers(self, *, fresh: bool = False) -> list[Offer]:
        """Live workers (online, a heartbeat within three intervals + 1 s) with their
        capacities, labels and usage; a read younger than ``VIEW_TTL`` is reused."""
        with self._lock:
            cached = self._view
        if not fresh and cached is not None and time.monotonic() - cached[0] < VIEW_TTL:
            return cached[1]
        silent_after = 3 * self.flow.config.heartbeat_interval + 1
        offers = [
            Offer(
                w.nodename,
                {**w.resources, SESSIONS: w.max_sessions},
                dict(w.labels),
                {**w.usage, SESSIONS: w.open_sessions},
            )
            for w in self.flow.store.workers()
            if w.status is WorkerStatus.ONLINE and w.heartbeat_age <= silent_after
        ]
        with self._lock:
            self._view = (time.monotonic(), offers)
        return offers

    def _count(self, nodename: str, needs: Needs) -> None:
        """Add an admission to the cached view, so the next ranking here sees it."""
        with self._lock:
            if self._view is None:
                return
            at, offers = self._view
            amounts = needs.amounts

            def add(o: Offer) -> Offer:
                used = {r: o.used.get(r, 0) + amounts.get(r, 0) for r in {*o.used, *amounts}}
                return replace(o, used=used) if o.nodename == nodename else o

            self._view = (at, [add(o) for o in offers])

    # -- creating ------------------------------------------------------------------------

    def create(self, new: NewSession, on_open: dict[str, Any] | None = None) -> str:
        """Return the node name of the worker that admitted ``new``.

        Raises :class:`SessionUnplaceable` at once when no live worker could ever
        take it (for a recreated session: when its worker is live but no longer
        fits), :class:`SessionCreationTimeout` after ``creation_timeout``.
        """
        needs, target = Needs.of(new), new.target_worker
        deadline = time.monotonic() + new.creation_timeout
        asked, fresh, delay = 0, False, _POLL_START
        silent: dict[str, tuple[str, float]] = {}  # nodename: (its unanswered reply id, when)
        while True:
            late = self._hear_late(new.id, silent)
            if late is not None:
                return late
            offers = self._candidates(target, fresh)
            verdict = rank(offers, needs)
            if not verdict.could and not fresh:
                fresh = True  # never refuse on a cached view
                continue
            if not verdict.could and (target is None or offers):
                why = explain_unplaceable(offers, needs)
                if asked and not self.flow.store.abandon_new(new, Reason.UNPLACEABLE.value):
                    return self._admitted_by(new.id)  # a worker took it meanwhile
                raise SessionUnplaceable(why)
            for offer in verdict.fits:
                if offer.nodename in silent:
                    continue
                asked += 1
                reply_id = f"sessionflow.created.{new.id}.{asked}"
                answer = self._ask(new, needs, offer.nodename, reply_id, deadline, on_open)
                if answer is None and self._admitted(new.id):
                    return self._admitted_by(new.id)
                if answer is None:  # its request stays queued: it may still admit
                    silent[offer.nodename] = (reply_id, time.monotonic())
                elif answer.get("taken"):  # another worker admitted it (we were slow)
                    return self._admitted_by(new.id)
                elif answer.get("session_id"):
                    self._count(offer.nodename, needs)
                    return str(answer.get("hostname") or offer.nodename)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)
            if asked and self._admitted(new.id):
                return self._admitted_by(new.id)
            fresh = True
        if not self.flow.store.abandon_new(new, Reason.CREATION_TIMEOUT.value):
            return self._admitted_by(new.id)  # admitted at the last moment
        raise SessionCreationTimeout(self._timeout_text(new, needs, verdict.could, silent))

    def _candidates(self, target: str | None, fresh: bool) -> list[Offer]:
        offers = self.offers(fresh=fresh)
        return offers if target is None else [o for o in offers if o.nodename == target]

    def _hear_late(self, session_id: str, silent: dict[str, tuple[str, float]]) -> str | None:
        """Forget the workers that answered since they were skipped as silent (a late
        ``busy`` must not keep the client from asking again once they have room), and
        those silent for ``REASK_AFTER``; the worker's node name if one admitted."""
        for nodename, (reply_id, since) in list(silent.items()):
            answer = self._answer_of(reply_id)
            if answer is not None and answer.get("session_id"):
                return str(answer.get("hostname") or nodename)
            if answer is not None and answer.get("taken"):
                return self._admitted_by(session_id)
            if answer is not None or time.monotonic() - since >= REASK_AFTER:
                del silent[nodename]
        return None

    def _answer_of(self, reply_id: str) -> dict[str, Any] | None:
        """A worker's answer to ``reply_id`` if it has come in (never waits)."""
        backend = self.flow.app.backend
        if isinstance(backend, DisabledBackend):
            return None
        try:
            meta = backend.get_task_meta(reply_id)
        except Exception:  # the backend is unreachable: the worker counts as silent
            logger.debug("sessionflow: could not read the answer %s", reply_id, exc_info=True)
            return None
        result = meta.get("result") if meta.get("status") == "SUCCESS" else None
        return result if isinstance(result, dict) else None

    def _ask(
        self,
        new: NewSession,
        needs: Needs,
        nodename: str,
        reply_id: str,
        deadline: float,
        on_open: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """Send the request to one worker; its answer, or None if it did not answer."""
        remaining = max(deadline - time.monotonic(), 0.001)
        self.flow.request_admission(
            new.id,
            remaining,
            make_queue(self.flow.config.worker_creation_queue(nodename)),
            reply_id,
            new=new,
            on_open=on_open,
            placed=needs.message(),
        )
        wait = min(ATTEMPT_TIMEOUT, remaining)
        if isinstance(self.flow.app.backend, DisabledBackend):
            until = time.monotonic() + wait
            while time.monotonic() < until:
                if self._admitted(new.id):
                    return {"session_id": new.id}
                time.sleep(0.005)
            return None
        try:
            answer = self.flow.app.AsyncResult(reply_id).get(
                timeout=wait, interval=0.005, propagate=False
            )
        except CeleryTimeout:
            return None
        return answer if isinstance(answer, dict) else None

    def _admitted(self, session_id: str) -> bool:
        found = self.flow.store.statuses([session_id]).get(session_id)
        return found is not None and found[0] is not SessionStatus.PENDING

    def _admitted_by(self, session_id: str) -> str:
        record = self.flow.store.get_session(session_id)
        return (record.hostname if record is not None else None) or ""

    def _timeout_text(
        self, new: NewSession, needs: Needs, could: list[Offer], silent: Iterable[str]
    ) -> str:
        target = new.target_worker
        if target is not None and not could:
            why = f"worker {target} is not live (no heartbeat lately): is it running?"
        else:
            why = explain_busy(could, needs, sorted(silent))
        return (
            f"no worker admitted the session within {new.creation_timeout} s; it asked for "
            f"{describe(needs)}: {why}. Complete sessions you no longer need, add workers, "
            "or raise their capacities (celery control sessions_resources / sessions_cap)"
        )

    def submit(self, new: NewSession, reply_id: str | None, on_open: dict[str, Any] | None) -> None:
        """Place ``new`` from a thread (``request_session``): the waiting handle learns the
        outcome from ``reply_id`` and the store (a failed row says why)."""

        def run() -> None:
            outcome: dict[str, Any]
            try:
                hostname = self.create(new, on_open)
                outcome = {"session_id": new.id, "hostname": hostname}
            except SessionUnplaceable as exc:
                self.flow.store.abandon_new(new, Reason.UNPLACEABLE.value)
                outcome = {"unplaceable": str(exc)}
            except SessionCreationTimeout as exc:
                outcome = {"timeout": str(exc)}
            except SessionFlowError as exc:
                logger.warning("sessionflow: could not place session %s: %s", new.id, exc)
                return
            if reply_id is not None and not isinstance(self.flow.app.backend, DisabledBackend):
                try:
                    self.flow.app.backend.store_result(reply_id, outcome, "SUCCESS")
                except Exception:  # the handle falls back to the store
                    logger.exception("sessionflow: could not answer for session %s", new.id)

        threading.Thread(target=run, name="sessionflow-place", daemon=True).start()

    # -- moving (soft affinity) ------------------------------------------------------------

    def move(self, record: SessionRecord) -> str | None:
        """Ask the best live worker to take over a moving session: None when asked (or
        every worker that could is full: a later sweep asks again), else why no live
        worker could ever take it."""
        needs = Needs.of(record)
        offers = self.offers(fresh=True)
        verdict = rank(offers, needs)
        if not verdict.could:
            return explain_unplaceable(offers, needs)
        if verdict.fits:
            queue = make_queue(self.flow.config.worker_creation_queue(verdict.fits[0].nodename))
            self.flow.request_admission(record.id, None, queue, move=True, placed=needs.message())
        return None


__all__ = ["ATTEMPT_TIMEOUT", "REASK_AFTER", "Placer"]

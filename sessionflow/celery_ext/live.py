"""The worker's live view of its own sessions: the authority while it runs.

The worker main process admitted these sessions, so it knows which are open,
what arrived and what runs, without asking the store. Pool processes learn
whether a session is still open from the *live directory*: one folder per open
session. A task claims its start by creating a link in its session's folder;
ending a session renames the folder first. Both are atomic, so a task either
started before the end (its link is in the renamed folder, and it finishes) or
does not start at all (its result is SessionClosed/SessionFailed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha1
from typing import Any

from ..config import safe_name
from ..errors import ended_error
from ..placement import Needs, Offer, judge
from ..records import Ended, SessionRecord
from ..resources import SESSIONS
from ..results import Resolver
from ..store import SessionStore

logger = logging.getLogger("sessionflow.worker")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}$")
_CLAIMED = "claimed"  # what a claim links to (it never exists)
RECENT = 10_000  # ended sessions remembered, to refuse their late messages without a lookup


def file_name(task_id: str) -> str:
    """The claim link of a task: its id when that is a safe file name, else a digest."""
    if _SAFE_FILE.match(task_id):
        return task_id
    return "h-" + sha1(task_id.encode("utf-8", "surrogatepass")).hexdigest()


def claim(live_dir: str, session_id: str, task_id: str) -> bool:
    """In any process of the worker: start ``task_id`` if its session is open here.

    The claim is a symlink (to nothing): on tmpfs, creating and removing one costs
    about 4 us less than a regular file, and it fails the same way once the folder
    was renamed away.
    """
    if not _SAFE_FILE.match(session_id):
        return False
    try:
        os.symlink(_CLAIMED, f"{live_dir}/{session_id}/{file_name(task_id)}")
    except FileExistsError:
        return True  # the same task again (a redelivery): it was claimed already
    except FileNotFoundError:
        return False
    return True


def make_live_dir(nodename: str) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = tempfile.mkdtemp(prefix=f"sessionflow-{safe_name(nodename)}-{os.getpid()}-", dir=base)
    return path


@dataclass
class Live:
    """One session this worker holds."""

    record: SessionRecord
    opened: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    queued: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    tasks: int = 0  # tasks that arrived here


class LiveSessions:
    """The open sessions of this worker process (main process only)."""

    def __init__(
        self,
        nodename: str,
        queue: str,
        cap: int,
        store: SessionStore,
        resolver: Resolver,
        flush: Callable[[], None],
        resources: dict[str, int] | None = None,
        labels: dict[str, str] | None = None,
        claimed: Callable[[str, set[str]], None] | None = None,
    ) -> None:
        self.nodename = nodename
        self.queue = queue
        self.cap = cap
        # Declared capacities (``sessions`` is ``cap``) and labels; control commands
        # replace them. ``_used``: the ``requires`` of the open sessions, added up.
        self.resources: dict[str, int] = dict(resources or {})
        self.labels: dict[str, str] = dict(labels or {})
        self._used: dict[str, int] = {}
        self.store = store
        self.resolver = resolver
        self.flush = flush
        # Given the started tasks whose start callback has not come yet when a session
        # ends, so the flush below writes their start too (the writer's ``claimed``).
        self.claimed = claimed
        self.dir = make_live_dir(nodename)
        self.pid = os.getpid()
        self.on_end: list[Callable[[Live, Ended | None, str, str], None]] = []
        # -- operations hooks (events, signals, metrics: sessionflow.celery_ext.observe) --
        self.on_open: list[Callable[[Live], None]] = []
        self.on_admission: list[Callable[[bool], None]] = []
        self.admission_paused: bool | None = None  # None until admission first decides
        self._lock = threading.RLock()
        self._sessions: dict[str, Live] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def in_this_process(self) -> bool:
        return os.getpid() == self.pid

    # -- reading ----------------------------------------------------------------------

    def count(self) -> int:
        return len(self._sessions)

    def has_room(self) -> bool:
        return len(self._sessions) < self.cap

    def get(self, session_id: str) -> Live | None:
        return self._sessions.get(session_id)

    def used(self) -> dict[str, int]:
        """What the open sessions hold of each declared resource (``requires`` added up)."""
        with self._lock:
            return {name: amount for name, amount in self._used.items() if amount}

    def offer(self) -> Offer:
        """This worker as placement sees it, right now."""
        with self._lock:
            return Offer(
                self.nodename,
                {**self.resources, SESSIONS: self.cap},
                dict(self.labels),
                {**self._used, SESSIONS: len(self._sessions)},
            )

    def judge(self, needs: Needs) -> tuple[str, str] | None:
        """None if a session asking for ``needs`` may open here now, else
        ``("mismatch" | "busy", why)``. Admission calls this and opens on its event
        loop, one request at a time: no capacity is ever exceeded."""
        return judge(self.offer(), needs)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def snapshot(self) -> list[Live]:
        with self._lock:
            return list(self._sessions.values())

    def ended(self, session_id: str) -> tuple[str, str] | None:
        """(status, reason) of a session that ended while this process held it."""
        return self._ended.get(session_id)

    # -- changes ----------------------------------------------------------------------

    def open(self, record: SessionRecord) -> None:
        os.makedirs(os.path.join(self.dir, record.id), exist_ok=True)
        live = Live(record)
        with self._lock:
            old = self._sessions.get(record.id)
            if old is not None:
                self._hold(old.record, -1)
            self._sessions[record.id] = live
            self._hold(record, 1)
        self._notify(self.on_open, live)

    def _hold(self, record: SessionRecord, sign: int) -> None:
        for name, amount in (record.requires or {}).items():
            self._used[name] = self._used.get(name, 0) + sign * amount

    def arrived(self, session_id: str, task_id: str) -> bool:
        with self._lock:
            live = self._sessions.get(session_id)
            if live is None:
                return False
            live.queued.add(task_id)
            live.tasks += 1
            live.last_activity = time.monotonic()
            return True

    def started(self, session_id: str, task_id: str) -> None:
        with self._lock:
            live = self._sessions.get(session_id)
            if live is not None:
                live.queued.discard(task_id)
                live.running.add(task_id)

    def finished(self, session_id: str, task_id: str) -> None:
        with self._lock:
            live = self._sessions.get(session_id)
            if live is not None:
                live.queued.discard(task_id)
                live.running.discard(task_id)
                live.last_activity = time.monotonic()
        with contextlib.suppress(OSError):
            os.unlink(f"{self.dir}/{session_id}/{file_name(task_id)}")

    def end(self, session_id: str) -> Ended | None:
        """The session ended in the store: let no task of it start, and settle the rest.

        Tasks already started here finish; every other registered task gets its
        SessionClosed / SessionFailed result. Returns what was settled (None if this
        worker did not hold the session or someone settled it already).
        """
        with self._lock:
            live = self._sessions.pop(session_id, None)
            if live is None:
                return None
            self._hold(live.record, -1)
            started = self._close_dir(session_id)
            running = set(live.running) | {
                tid for tid in live.queued | live.running if file_name(tid) in started
            }
        unheard = running - live.running  # claimed in the pool, callback still on its way
        if unheard and self.claimed is not None:
            self.claimed(session_id, unheard)
        self.flush()  # the store must know every end and start this process has seen
        ended = self.store.settle(session_id, running=running)
        status, reason = self._record_end(session_id, ended)
        if ended is not None:
            self.resolver.resolve(ended)
        # Queued here but maybe not registered yet (their client registers in batches).
        waiting = live.queued - running - set(ended.cancelled if ended else ())
        if waiting:
            self.resolver.store_failures(waiting, ended_error(session_id, status, reason))
        for hook in self.on_end:
            try:
                hook(live, ended, status, reason)
            except Exception:
                logger.exception("sessionflow: end hook failed for %s", session_id)
        return ended

    def set_admission_paused(self, paused: bool) -> None:
        """The admission step stopped (or resumed) taking creation requests.

        Hooks hear only changes after the first decision (not the start itself)."""
        before, self.admission_paused = self.admission_paused, paused
        if before is not None and before != paused:
            self._notify(self.on_admission, paused)

    def _notify(self, hooks: list[Callable[[Any], None]], value: Any) -> None:
        for hook in hooks:
            try:
                hook(value)
            except Exception:
                logger.exception("sessionflow: %r hook failed", hook)

    def _record_end(self, session_id: str, ended: Ended | None) -> tuple[str, str]:
        if ended is not None:
            status, reason = ended.status.value, ended.reason
        else:
            found = self.store.statuses([session_id]).get(session_id)
            status, reason = (found[0].value, found[1] or "") if found else ("closed", "")
        with self._lock:
            self._ended[session_id] = (status, reason)
            while len(self._ended) > RECENT:
                self._ended.popitem(last=False)
        return status, reason

    def _close_dir(self, session_id: str) -> set[str]:
        """Atomically stop new starts; returns the claim links of tasks that started."""
        folder = os.path.join(self.dir, session_id)
        closed = os.path.join(self.dir, f".ended-{session_id}-{time.monotonic_ns()}")
        try:
            os.rename(folder, closed)
        except FileNotFoundError:
            return set()
        try:
            return set(os.listdir(closed))
        finally:
            shutil.rmtree(closed, ignore_errors=True)

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        """This worker's view, for ``celery inspect sessions``."""
        now = time.monotonic()
        with self._lock:
            return {
                "cap": self.cap,
                "open": len(self._sessions),
                "free": max(self.cap - len(self._sessions), 0),
                "resources": dict(self.resources),
                "used": {name: self._used.get(name, 0) for name in self.resources},
                "labels": dict(self.labels),
                "admission_paused": bool(self.admission_paused),
                "sessions": {
                    sid: {
                        "age": round(now - live.opened, 3),
                        "idle": round(now - live.last_activity, 3),
                        "tasks": live.tasks,
                        "queued": len(live.queued),
                        "running": len(live.running),
                        "user_id": live.record.user_id,
                        "agent_id": live.record.agent_id,
                        "requires": dict(live.record.requires or {}),
                    }
                    for sid, live in self._sessions.items()
                },
            }

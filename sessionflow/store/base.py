"""The session store's contract: what every backend (SQL, in-memory) must do.

Each method documents its contract once; ``tests/unit/store_contract.py`` checks
every backend against it. Nothing outside a backend module runs SQL.

Races are decided by the store: every transition is conditional (``open`` →
``closed`` only if still open, pending → open only if still pending), so of two
callers exactly one wins and the other learns it lost.

One class on purpose (as huey's ``BaseStorage``): the whole contract a backend
must meet reads in one place, a documented method each; what the methods take
and return are the frozen dataclasses of :mod:`sessionflow.records`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any

from ..enums import SessionStatus, WorkerStatus
from ..records import (
    BranchStart,
    Dispatch,
    Ended,
    Merger,
    NewSession,
    PruneCounts,
    Run,
    RunRecord,
    SessionRecord,
    StateWrite,
    TaskRecord,
    WorkerRecord,
)


class SessionStore(ABC):
    """Sessions, workers, task registrations and runs, state and branches."""

    #: ``sqlite``, ``postgresql`` or ``memory``.
    dialect: str = ""

    # -- schema and process ----------------------------------------------------

    @abstractmethod
    def upgrade(self) -> str:
        """Apply pending migrations; returns the revision now in force."""

    @abstractmethod
    def revision(self) -> str | None:
        """The schema revision in force (None: no schema yet). Never migrates."""

    @abstractmethod
    def secret(self) -> bytes:
        """A random key shared through the store (created once), for signing headers."""

    @abstractmethod
    def dispose(self) -> None:
        """Close this process's connections; the store reconnects on next use."""

    # -- sessions --------------------------------------------------------------

    @abstractmethod
    def create_pending(self, new: NewSession) -> bool:
        """Insert a pending session; False (nothing changed) if that id exists."""

    @abstractmethod
    def get_session(self, session_id: str, *, with_heartbeat: bool = False) -> SessionRecord | None:
        """The session, or None. ``with_heartbeat`` fills ``last_heartbeat_at`` of its worker."""

    @abstractmethod
    def list_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        hostname: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[SessionRecord]:
        """Sessions users can see (not pending, except moving ones), oldest first.

        ``status=OPEN`` includes moving sessions.
        """

    @abstractmethod
    def statuses(self, session_ids: Collection[str]) -> dict[str, tuple[SessionStatus, str | None]]:
        """(status, reason) of each session that exists, in one query."""

    @abstractmethod
    def open_new(self, new: NewSession, nodename: str, queue: str) -> SessionRecord | None:
        """Open a new session on ``nodename`` in one statement: insert it, or open its
        pending (not moving) row; None if the id exists otherwise (abandoned, taken)."""

    @abstractmethod
    def abandon_new(self, new: NewSession, reason: str) -> bool:
        """Record a session nobody admitted as failed (``reason``): insert it, or fail its
        pending (not moving) row; False if a worker admitted it after all."""

    @abstractmethod
    def stale_pending(self) -> list[NewSession]:
        """Pending (not moving) sessions whose ``creation_timeout`` has passed."""

    @abstractmethod
    def abandon_pending(
        self, session_id: str, reason: str, *, status: SessionStatus = SessionStatus.FAILED
    ) -> bool:
        """End a pending, not moving session nobody admitted (failed, or ``status``: closed
        when its caller completed it); False if it is not pending."""

    @abstractmethod
    def admit(self, session_id: str, nodename: str, queue: str) -> SessionRecord | None:
        """Open a pending session on ``nodename`` (a moving one keeps its clocks).

        None when it is not pending any more or is addressed to another worker.
        The caller keeps the count of its open sessions; the store does not count.
        """

    @abstractmethod
    def dispatch(self, dispatch: Dispatch) -> str | None:
        """Register tasks about to be sent and take their turns: one statement.

        Returns the session's queue; None (nothing recorded) if the session is not
        open or the tasks would take it past ``max_turns``. Groups are recorded
        with a snapshot of the session's own state keys when ``snapshot_now``.
        A task id registered before is not registered again (but counts a turn).
        """

    @abstractmethod
    def late_dispatch(self, dispatch: Dispatch) -> tuple[str, ...]:
        """Register sent tasks whose :meth:`dispatch` came after the session's end.

        While the session is open, or ended and not settled yet, every task is
        registered (its turns taken, no limit checked: the messages are sent) and
        :meth:`settle` settles them; returns (). Otherwise nothing is written and
        the ids that are still unknown are returned: neither registered nor
        ``running`` when the session was settled. Only those have no result coming.
        """

    @abstractmethod
    def undo_dispatch(self, dispatch: Dispatch) -> None:
        """Take back a dispatch whose messages could not be sent: its turns,
        registrations and groups."""

    @abstractmethod
    def end_session(
        self,
        session_id: str,
        status: SessionStatus,
        reason: str,
        *,
        from_states: Collection[SessionStatus] = (SessionStatus.OPEN,),
        hostname: str | None = None,
    ) -> bool:
        """Close or fail a session if it is in ``from_states`` (and on ``hostname``).

        The session becomes unsettled: its unfinished tasks are settled by
        :meth:`settle`, by its worker or, when that worker is gone, by a sweeper.
        """

    @abstractmethod
    def settle(
        self, session_id: str, *, running: Collection[str] = (), lose_started: bool = False
    ) -> Ended | None:
        """Settle an ended session's tasks, once: None if it is not ended or was settled.

        Registered tasks with no finished run that are not ``running`` (and have
        no run in progress) become cancelled; with ``lose_started`` the running
        ones become lost. ``running`` are the ids the worker knows have started;
        those not registered yet (their client registers in batches) are
        registered now, so :meth:`late_dispatch` knows they have a result coming.
        """

    @abstractmethod
    def unsettled(self, hostname: str | None = None) -> list[tuple[str, str | None]]:
        """Ended, unsettled sessions (id, hostname), optionally of one worker."""

    @abstractmethod
    def begin_move(self, session_id: str, hostname: str) -> Ended | None:
        """Soft affinity: detach an open session from its lost worker (pending, moving).

        Tasks it was running are lost (returned); queued ones stay registered.
        """

    @abstractmethod
    def stalled_moves(self) -> list[str]:
        """Moving sessions no worker took within their ``creation_timeout``."""

    @abstractmethod
    def moving(self) -> list[SessionRecord]:
        """Sessions that are changing workers (pending, moving), oldest first or any order."""

    @abstractmethod
    def open_sessions(self, nodename: str) -> list[SessionRecord]:
        """Open sessions of a worker."""

    @abstractmethod
    def open_ids(self, nodename: str) -> set[str]:
        """Ids of the open sessions of a worker: what its ticker checks every second
        (one indexed query; :meth:`statuses` of a thousand ids cost it five times more)."""

    # -- tasks and runs ----------------------------------------------------------

    @abstractmethod
    def record_runs(self, runs: Sequence[Run]) -> None:
        """Upsert runs by (session, task id, attempt): one statement for the whole batch.

        A later record of the same run replaces state, ``finished_at`` and error
        (a finished run is never turned back into a running one).
        """

    @abstractmethod
    def tasks(self, session_id: str) -> list[TaskRecord]:
        """Every registered task of a session with its status, in dispatch order."""

    @abstractmethod
    def lose_interrupted(
        self, nodename: str, *, silent_for: float | None = None, reason: str = "worker_restarted"
    ) -> list[Ended]:
        """Runs a process of ``nodename`` left unfinished become ``LOST``; their tasks
        (if not finished) are lost. One Ended per session, with ``reason``.

        At worker start every such run; from a sweeper (``silent_for``: how long the
        worker has been silent) only runs of sessions whose ``heartbeat_timeout`` is
        shorter than that (a worker killed while it finished its tasks after a warm
        shutdown, say)."""

    @abstractmethod
    def lose_missing(
        self, session_id: str, present: Collection[str], before: datetime
    ) -> Ended | None:
        """Unsettled tasks registered before ``before`` that are not ``present`` in any
        queue and not running: their messages are gone. They become lost."""

    @abstractmethod
    def history(self, session_id: str, limit: int | None, bound: int) -> list[RunRecord]:
        """Finished runs, oldest first: the newest ``min(limit, bound)``."""

    @abstractmethod
    def compact(self, session_id: str, keep_last: int, bound: int | None = None) -> int:
        """Delete all but the newest ``keep_last`` finished runs; returns how many of the
        runs history showed went (with ``bound``, runs beyond it go silently first)."""

    # -- workers -----------------------------------------------------------------

    @abstractmethod
    def register_worker(
        self,
        nodename: str,
        *,
        host: str,
        pid: int,
        queue: str,
        max_sessions: int,
        is_alive: Callable[[str | None, int, float], bool],
        resources: dict[str, int] | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        """Record a worker process starting as ``nodename``, with its declared capacities
        (``resources``, without ``sessions``: that is ``max_sessions``) and labels.

        If the row shows another process holding the name, ``is_alive(host, pid,
        heartbeat_age)`` decides whether it still runs; if so this raises
        :class:`~sessionflow.errors.NodeNameInUse` and changes nothing.
        """

    @abstractmethod
    def clock(self) -> datetime:
        """The store's clock (heartbeats and ends are stamped with it)."""

    @abstractmethod
    def heartbeat(
        self,
        nodename: str,
        *,
        at: datetime | None = None,
        max_sessions: int | None = None,
        resources: dict[str, int] | None = None,
        labels: dict[str, str] | None = None,
        online: bool = True,
    ) -> None:
        """Stamp the worker's heartbeat with ``at`` (default: the store's clock now); the
        cap, capacities and labels given replace the stored ones (None: unchanged).
        The worker becomes online; ``online=False`` keeps its status (a worker that
        finishes its running tasks after a warm shutdown stays offline)."""

    @abstractmethod
    def worker_offline(self, nodename: str) -> None:
        """The worker says it is shutting down warmly."""

    @abstractmethod
    def silent_workers(self, min_age: float) -> list[tuple[str, float, WorkerStatus]]:
        """Workers with open or unsettled sessions, or unfinished runs, whose heartbeat
        is older than ``min_age`` s: (node name, age in s on the store's clock, status)."""

    @abstractmethod
    def workers(self) -> list[WorkerRecord]:
        """Every worker the store knows, by node name, with heartbeat age, open sessions,
        capacities, labels and usage (the sum of the ``requires`` of its open sessions),
        all read in one statement."""

    @abstractmethod
    def take_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Hold the lease ``name`` for ``ttl`` s if it is free, expired or ours."""

    @abstractmethod
    def holds_lease(self, name: str, holder: str) -> bool:
        """Whether ``holder`` still holds an unexpired lease ``name``."""

    # -- state -------------------------------------------------------------------

    @abstractmethod
    def session_user(self, session_id: str) -> str | None:
        """The session's ``user_id``."""

    @abstractmethod
    def state_read(self, scope: str, scope_id: str, key: str) -> tuple[Any, int]:
        """(value or MISSING, version; 0 when the key never existed)."""

    @abstractmethod
    def state_scope(self, scope: str, scope_id: str) -> dict[str, tuple[Any, int]]:
        """Every present key of a scope: key -> (value, version), in key order."""

    @abstractmethod
    def state_write(
        self, session_id: str, writes: Sequence[StateWrite], limit: int
    ) -> dict[str, int]:
        """Apply all writes in one transaction, or none; returns each key's new version.

        Raises StateConflict (every key whose version moved), StateValueError
        (a scope would exceed ``limit`` bytes), or the ended/not-found error of the
        session when it is not open (or pending).
        """

    @abstractmethod
    def state_atomic(
        self,
        session_id: str,
        scope: str,
        scope_id: str,
        op: tuple[str, str, Any],
        value_limit: int,
        scope_limit: int,
    ) -> Any:
        """Apply an increment/append under the key's lock; returns the new value."""

    @abstractmethod
    def state_clear(self, session_id: str) -> None:
        """Delete every session-scope key of the session."""

    # -- branches ------------------------------------------------------------------

    @abstractmethod
    def branch_view(self, group_id: str, member: int, seq: int) -> BranchStart | None:
        """The snapshot (taken now if the group has none yet) and the operations of
        the member's earlier finished steps; None if the group is merged or unknown."""

    @abstractmethod
    def branch_done(
        self,
        group_id: str,
        member: int,
        seq: int,
        ops: list[tuple[str, str, Any]],
        merger: Merger,
    ) -> Exception | None:
        """Save a finished branch task's operations; the last one merges the group.

        Returns the merge's error (the group is then marked conflicted and nothing
        is merged), else None.
        """

    @abstractmethod
    def branch_failed(
        self, group_id: str, member: int, seq: int, member_len: int, merger: Merger
    ) -> Exception | None:
        """A branch task failed: it and the member's later steps count as finished
        with nothing to merge."""

    # -- retention -----------------------------------------------------------------

    @abstractmethod
    def prune(self, ended_before: datetime, *, batch: int, dry_run: bool = False) -> PruneCounts:
        """Delete up to ``batch`` settled sessions ended before ``ended_before``, with
        their tasks, runs, branches and session-scope state (``dry_run``: count all)."""

    @abstractmethod
    def trim_history(self, bound: int, *, batch: int) -> int:
        """Delete runs beyond the newest ``bound`` of each session; returns how many."""

    @abstractmethod
    def reclaim(self) -> None:
        """Let the database reuse the space of deleted rows now (after a prune)."""


__all__ = ["BranchStart", "Merger", "SessionStore", "StateWrite"]

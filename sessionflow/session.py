"""Client-side handle of one session: info, task dispatch, state, completion."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery.result import AsyncResult, GroupResult

from . import branches, canvas, limits, tokens
from .enums import Reason, SessionState, SessionStatus
from .errors import SessionNotFound, TurnLimitExceeded, ended_error
from .records import Dispatch, RunRecord, SessionRecord

if TYPE_CHECKING:
    from .flow import SessionFlow
    from .state import State

logger = logging.getLogger("sessionflow")


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session's metadata, read from the store.

    Holds no key: ``recreate_token`` is a signed token, not the key that signs it.
    """

    session_id: str
    hostname: str
    state: SessionState
    reason: str | None
    user_id: str | None
    agent_id: str | None
    metadata: dict[str, Any]
    queue: str
    turns: int
    created_at: datetime
    opened_at: datetime | None
    closed_at: datetime | None
    last_heartbeat_at: datetime | None
    max_turns: int | None
    recreate_token: str  # for SessionFlow.recreate_session on the same worker

    @classmethod
    def from_record(cls, record: SessionRecord, key: bytes) -> SessionInfo:
        if record.status is SessionStatus.PENDING:
            # A session changing workers (soft affinity) is still open to its users.
            state = SessionState.OPEN if record.moving else SessionState.PENDING
        else:
            state = SessionState(record.status.value)
        hostname = record.hostname or ""
        return cls(
            session_id=record.id,
            hostname=hostname,
            state=state,
            reason=None if record.moving else record.reason,
            user_id=record.user_id,
            agent_id=record.agent_id,
            metadata=dict(record.metadata or {}),
            queue=record.queue or "",
            turns=record.turns,
            created_at=record.created_at,
            opened_at=record.opened_at,
            closed_at=record.closed_at,
            last_heartbeat_at=record.last_heartbeat_at,
            max_turns=record.max_turns,
            recreate_token=tokens.make_token(key, record.id, hostname) if hostname else "",
        )


class Session:
    """A group of tasks pinned to one worker. Use as a context manager."""

    def __init__(self, flow: SessionFlow, session_id: str) -> None:
        self._flow = flow
        self.id = session_id

    def __repr__(self) -> str:
        return f"<Session {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a Session is bound to its process's app: pass session.id and use "
            "flow.get_session(id) on the other side"
        )

    @property
    def info(self) -> SessionInfo:
        """Current metadata, read from the store on every access."""
        record = self._flow.store.get_session(self.id, with_heartbeat=True)
        if record is None:
            raise SessionNotFound(f"session {self.id!r} no longer exists in the store")
        return SessionInfo.from_record(record, self._flow.signing_key)

    # -- sending tasks ------------------------------------------------------------

    def apply_async(
        self, obj: Any, args: Any = (), kwargs: Any = None, **options: Any
    ) -> AsyncResult | GroupResult:
        """Send a task, signature or canvas to run entirely on the session's worker.

        One store statement registers all its tasks, whatever the canvas size.
        Raises :class:`SessionClosed` / :class:`SessionFailed` if the session is not
        open, :class:`TurnLimitExceeded` past ``max_turns``; nothing is sent then.
        """
        if "task_id" in options:
            limits.text("task_id", options["task_id"])
        sig = canvas.build_signature(obj, args, kwargs, options)
        sig.freeze()
        tasks = tuple((leaf.id, leaf.task) for leaf in canvas.leaves(sig))
        for task_id, name in tasks:
            limits.text("task id", task_id)
            limits.text("task name", name, optional=True)
        groups, branch_headers = branches.plan(sig)
        dispatch = Dispatch(self.id, tasks, groups)
        store = self._flow.store
        queue = store.dispatch(dispatch)
        if queue is None and self._await_move():
            queue = store.dispatch(dispatch)
        if queue is None:
            raise self._refusal(len(tasks))
        key = self._flow.signing_key
        canvas.stamp(
            sig, self.id, queue, lambda tid: tokens.sign_task(key, self.id, tid), branch_headers
        )
        try:
            result: AsyncResult | GroupResult = sig.apply_async()
        except BaseException:
            try:
                store.undo_dispatch(dispatch)
            except Exception:
                logger.exception("sessionflow: could not take back the turns of %s", self.id)
            raise
        return result

    def delay(self, task: Any, *args: Any, **kwargs: Any) -> AsyncResult | GroupResult:
        """``s.delay(task, *args, **kwargs)``: like ``task.delay``, in this session."""
        return self.apply_async(task, args, kwargs)

    def send_task(
        self, name: str, args: Any = (), kwargs: Any = None, **options: Any
    ) -> AsyncResult | GroupResult:
        """Like ``app.send_task(name, ...)``, in this session (the task need not be
        registered in this process)."""
        limits.text("name", name)
        return self.apply_async(self._flow.app.signature(name), args, kwargs, **options)

    def _refusal(self, count: int) -> Exception:
        record = self._flow.store.get_session(self.id)
        if (
            record is not None
            and record.status is SessionStatus.OPEN
            and record.max_turns is not None
        ):
            return TurnLimitExceeded(
                f"session {self.id} has used {record.turns} of its {record.max_turns} "
                f"turns; these {count} task(s) would exceed it. Complete it and create a "
                "new session (recreate_session keeps the same worker)."
            )
        return ended_error(
            self.id,
            record.status.value if record else None,
            record.reason if record else None,
        )

    def _await_move(self) -> bool:
        """If the session is moving to another worker, wait for it; True once it is open."""
        record = self._flow.store.get_session(self.id)
        if record is None or not record.moving:
            return False
        deadline = time.monotonic() + record.creation_timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            status = self._flow.store.statuses([self.id]).get(self.id)
            if status is None or status[0] is not SessionStatus.PENDING:
                return status is not None and status[0] is SessionStatus.OPEN
        return False

    # -- state and history --------------------------------------------------------

    @property
    def state(self) -> State:
        """Durable key/value state shared by the session's tasks (see ``sessionflow.state``)."""
        from .state import state_for

        return state_for(self)

    def history(self, limit: int | None = None) -> list[RunRecord]:
        """The session's task runs, oldest first (``limit``: only the newest ones)."""
        limits.whole("limit", limit, minimum=1, optional=True)
        return self._flow.store.history(self.id, limit, self._flow.config.history_max_runs)

    def compact(self, keep_last: int) -> int:
        """Keep only the newest ``keep_last`` task runs in the history; returns runs dropped."""
        limits.whole("keep_last", keep_last, minimum=0)
        return self._flow.store.compact(self.id, keep_last, self._flow.config.history_max_runs)

    # -- ending -------------------------------------------------------------------

    def complete(self) -> None:
        """End the session and free its worker slot; safe to call more than once.

        Tasks that have not started will not run; their results raise SessionClosed.
        When this returns, no task of the session starts any more.
        """
        self._flow.end_session(self.id, SessionStatus.CLOSED, Reason.COMPLETED.value)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.complete()

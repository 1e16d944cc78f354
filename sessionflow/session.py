"""Client-side handle of one session: info, task dispatch, completion."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery.result import AsyncResult, GroupResult

from . import canvas, tokens
from .errors import SessionClosed, SessionFailed, SessionNotFound, TurnLimitExceeded
from .store import CLOSED, FAILED, MOVING, OPEN, PENDING

if TYPE_CHECKING:
    from sqlalchemy import RowMapping

    from .flow import SessionFlow
    from .history import RunRecord
    from .state import State


class SessionState(str, Enum):
    """Lifecycle state of a session as users see it."""

    OPEN = "open"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session's metadata, read from the store."""

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
    _secret_key: str | None

    @property
    def recreate_token(self) -> str:
        """Opaque signed token for :meth:`SessionFlow.recreate_session` on the same worker."""
        return tokens.make_token(self._secret_key, self.session_id, self.hostname)

    @classmethod
    def from_row(cls, row: RowMapping, secret_key: str | None) -> SessionInfo:
        return cls(
            session_id=row["id"],
            hostname=row["hostname"] or "",
            # A session changing workers (soft affinity) is still open to its users.
            state=SessionState(OPEN if row["status"] == PENDING else row["status"]),
            reason=row["reason"],
            user_id=row["user_id"],
            agent_id=row["agent_id"],
            metadata=dict(row["metadata"] or {}),
            queue=row["queue"] or "",
            turns=row["turns"],
            created_at=row["created_at"],
            opened_at=row["opened_at"],
            closed_at=row["closed_at"],
            last_heartbeat_at=row.get("last_heartbeat_at"),
            max_turns=row["max_turns"],
            _secret_key=secret_key,
        )


def ended_error(session_id: str, status: str | None, reason: str | None) -> Exception:
    """The error for work sent to, or left in, a session that is not open."""
    if status == FAILED:
        return SessionFailed(
            f"session {session_id} failed ({reason}); create a new session to continue",
            session_id,
            reason or "unknown",
        )
    if status == CLOSED:
        return SessionClosed(
            f"session {session_id} is closed ({reason}); create a new session to continue",
            session_id,
            reason or "completed",
        )
    return SessionNotFound(f"no session {session_id!r} in the store")


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

    @property
    def info(self) -> SessionInfo:
        """Current metadata, read from the store on every access."""
        row = self._flow.store.get_session(self.id, with_heartbeat=True)
        if row is None:
            raise SessionNotFound(f"session {self.id!r} no longer exists in the store")
        return SessionInfo.from_row(row, self._flow.config.secret_key)

    def apply_async(
        self, obj: Any, args: Any = (), kwargs: Any = None, **options: Any
    ) -> AsyncResult | GroupResult:
        """Send a task, signature or canvas to run entirely on the session's worker.

        Raises :class:`SessionClosed` / :class:`SessionFailed` if the session is not open.
        """
        sig = canvas.build_signature(obj, args, kwargs, options)
        sig.freeze()
        dispatched = [(leaf.id, leaf.task) for leaf in canvas.leaves(sig)]
        store = self._flow.store
        queue = store.register_tasks(self.id, dispatched)
        if queue is None and self._await_move():
            queue = store.register_tasks(self.id, dispatched)
        if queue is None:
            row = store.get_session(self.id)
            if row is not None and row["status"] == OPEN and row["max_turns"] is not None:
                raise TurnLimitExceeded(
                    f"session {self.id} has used {row['turns']} of its {row['max_turns']} "
                    f"turns; these {len(dispatched)} task(s) would exceed it. Complete it and "
                    "create a new session (recreate_session keeps the same worker)."
                )
            raise ended_error(
                self.id, row["status"] if row else None, row["reason"] if row else None
            )
        canvas.stamp(sig, self.id, queue)
        from .branches import on_dispatch

        on_dispatch(self._flow, self.id, sig)
        try:
            result: AsyncResult | GroupResult = sig.apply_async()
        except BaseException:
            store.forget_tasks([task_id for task_id, _ in dispatched])
            raise
        return result

    @property
    def state(self) -> State:
        """Durable key/value state shared by the session's tasks (see ``sessionflow.state``)."""
        from .state import state_for

        return state_for(self)

    def history(self, limit: int | None = None) -> list[RunRecord]:
        """The session's task runs, oldest first (``limit``: only the newest ones)."""
        from .history import history

        return history(self._flow, self.id, limit)

    def compact(self, keep_last: int) -> int:
        """Keep only the newest ``keep_last`` task runs in the history; returns runs dropped."""
        from .history import compact

        return compact(self._flow, self.id, keep_last)

    def _await_move(self) -> bool:
        """If the session is moving to another worker, wait for it; True once it is open."""
        row = self._flow.store.get_session(self.id)
        if row is None or row["status"] != PENDING or row["reason"] != MOVING:
            return False
        deadline = time.monotonic() + row["creation_timeout"]
        while time.monotonic() < deadline:
            time.sleep(0.05)
            status = self._flow.store.get_status(self.id)
            if status != PENDING:
                return status == OPEN
        return False

    def complete(self) -> None:
        """End the session and free its worker slot; safe to call more than once.

        Tasks that have not started will not run; their results raise SessionClosed.
        """
        self._flow.end_session(self.id, CLOSED, "completed")

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.complete()

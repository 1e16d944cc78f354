"""Client-side handle of one session: info, task dispatch, state, completion."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery.result import AsyncResult, GroupResult
from celery.utils import uuid

from . import branches, canvas, limits, tokens
from .enums import Reason, SessionState, SessionStatus
from .errors import SessionNotFound, TurnLimitExceeded, ended_error
from .records import Dispatch, RunRecord, SessionRecord
from .transactions import django_on_commit

if TYPE_CHECKING:
    from .flow import SessionFlow
    from .state import State

logger = logging.getLogger("sessionflow")
STATUS_TTL = 0.5  # seconds a session's status read by this process is trusted for sending


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
    # What the session asked of its worker (see Placement in the README); empty: nothing.
    requires: dict[str, int] = field(default_factory=dict)
    constraints: dict[str, list[Any]] = field(default_factory=dict)
    prefer: list[list[Any]] = field(default_factory=list)
    placement: str | None = None

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
            requires=dict(record.requires or {}),
            constraints=dict(record.constraints or {}),
            prefer=list(record.prefer or []),
            placement=record.placement,
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
        self._flow.flush_requested(self.id)
        record = self._flow.store.get_session(self.id, with_heartbeat=True)
        if record is None:
            raise SessionNotFound(f"session {self.id!r} no longer exists in the store")
        self._flow.session_cache[self.id] = (record, time.monotonic())
        return SessionInfo.from_record(record, self._flow.signing_key)

    # -- sending tasks ------------------------------------------------------------

    def apply_async(
        self,
        obj: Any,
        args: Any = (),
        kwargs: Any = None,
        *,
        complete_when_done: bool = False,
        **options: Any,
    ) -> AsyncResult | GroupResult:
        """Send a task, signature or canvas to run entirely on the session's worker.

        A single task costs no store round trip (its registration follows in a batch);
        a canvas, or any task of a session with ``max_turns``, is registered in one
        statement before it is sent, whatever its size.
        Raises :class:`SessionClosed` / :class:`SessionFailed` if the session is not
        open, :class:`TurnLimitExceeded` past ``max_turns``, :class:`BrokerError` if the
        broker cannot be reached; nothing is sent then.

        ``complete_when_done=True``: the session completes once this canvas finished,
        whether it succeeded or failed (the failure still reaches the caller's
        ``.get()``): the web pattern "start the work, answer, let it end the session".
        """
        canvas.check_send(obj, args, kwargs, complete_when_done, options)
        with canvas.sending(self._flow.app, "the task's arguments"):  # on failure: none counted
            return self._send(obj, args, kwargs, complete_when_done, options)

    def _send(
        self, obj: Any, args: Any, kwargs: Any, complete_when_done: bool, options: dict[str, Any]
    ) -> AsyncResult | GroupResult:
        if canvas.is_task(obj) and not complete_when_done:
            quick = self._send_task_quickly(obj, args, kwargs, options)
            if quick is not None:
                return quick
        sig = canvas.signature_of(obj, args, kwargs, options)  # checked by check_send
        sig.freeze()
        tasks = tuple((leaf.id, leaf.task) for leaf in canvas.leaves(sig))
        for task_id, name in tasks:
            limits.text("task id", task_id)
            limits.text("task name", name, optional=True)
        groups, branch_headers = branches.plan(sig)
        key = self._flow.signing_key
        if len(tasks) == 1 and not groups:
            record = self._open_record()
            if record.max_turns is None and record.queue:
                # One task, no turn limit: no store round trip. The worker checks its
                # signature; its registration follows in a batch (see registrar.py).
                canvas.stamp(
                    sig, self.id, record.queue, lambda tid: tokens.sign_task(key, self.id, tid)
                )
                single: AsyncResult = sig.apply_async()
                self._flow.registrar.add(self.id, tasks)
                return single
        dispatch = Dispatch(self.id, tasks, groups)
        store = self._flow.store
        queue = store.dispatch(dispatch)
        if queue is None and self._await_move():
            queue = store.dispatch(dispatch)
        if queue is None:
            raise self._refusal(len(tasks))
        canvas.stamp(
            sig, self.id, queue, lambda tid: tokens.sign_task(key, self.id, tid), branch_headers
        )
        try:
            result = self._then_complete(sig) if complete_when_done else sig.apply_async()
        except BaseException:
            try:
                store.undo_dispatch(dispatch)
            except Exception:
                logger.exception("sessionflow: could not take back the turns of %s", self.id)
            raise
        return result

    def _send_task_quickly(
        self, task: Any, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> AsyncResult | None:
        """A plain task of a session without ``max_turns``: sent as ``task.apply_async``
        would, with the session's headers, and no store round trip (None: take the
        general path). Its arguments were checked by ``canvas.check_send``."""
        record = self._open_record()
        if record.max_turns is not None or not record.queue:
            return None
        task_id = options.pop("task_id", None) or uuid()
        limits.text("task name", task.name, optional=True)
        headers = dict(options.pop("headers", None) or {})
        headers.update(
            {
                canvas.SESSION_HEADER: self.id,
                canvas.QUEUE_HEADER: record.queue,
                canvas.SIG_HEADER: tokens.sign_task(self._flow.signing_key, self.id, task_id),
            }
        )
        result: AsyncResult = task.apply_async(
            tuple(args),
            dict(kwargs or {}),
            task_id=task_id,
            headers=headers,
            **canvas.NO_ROUTE,
            **options,
        )
        self._flow.registrar.add(self.id, ((task_id, task.name),))
        return result

    def _then_complete(self, sig: Any) -> AsyncResult | GroupResult:
        """Send ``sig`` (stamped) followed by the task that completes this session; it also
        runs as the errback of every task, so a failure completes the session too."""
        import warnings

        from celery import chain
        from celery.exceptions import CPendingDeprecationWarning

        from .celery_ext.joining import END_TASK

        end = self._flow.app.signature(END_TASK, args=(self.id,), immutable=True)
        whole = chain(sig, end)  # a group followed by a task becomes a chord: all, then end
        with warnings.catch_warnings():
            # Linking to a chord warns about task_allow_error_cb_on_chord_header; either
            # value completes the session: a failed header task fails the chord body, whose
            # errbacks run.
            warnings.simplefilter("ignore", CPendingDeprecationWarning)
            whole.link_error(end)
            sent = whole.apply_async()
        parent = getattr(sent, "parent", None)
        result: AsyncResult | GroupResult = parent if parent is not None else sent
        return result

    def apply_async_on_commit(
        self, obj: Any, args: Any = (), kwargs: Any = None, **options: Any
    ) -> None:
        """Django: :meth:`apply_async` when the current transaction commits (never after a
        rollback), like Celery's ``delay_on_commit``. Arguments are checked now."""
        canvas.check_send(
            obj,
            args,
            kwargs,
            options.get("complete_when_done", False),
            {k: v for k, v in options.items() if k != "complete_when_done"},
        )
        django_on_commit(lambda: self.apply_async(obj, args, kwargs, **options))

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

    def _open_record(self) -> SessionRecord:
        """The session as last read (at most ``STATUS_TTL`` ago); raises if it ended.

        Another process's end may take up to ``STATUS_TTL`` to be seen here; a task sent
        in that time is refused by the worker and its result raises the same error.
        """
        cache = self._flow.session_cache
        hit = cache.get(self.id)
        if hit is None or time.monotonic() - hit[1] > STATUS_TTL:
            record = self._flow.store.get_session(self.id)
            if record is None:
                raise SessionNotFound(f"no session {self.id!r} in the store")
            if record.moving and self._await_move():
                record = self._flow.store.get_session(self.id) or record
            cache[self.id] = hit = (record, time.monotonic())
        record = hit[0]
        if record.status is not SessionStatus.OPEN:
            cache.pop(self.id, None)
            raise ended_error(self.id, record.status.value, record.reason)
        return record

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
        self._flow.registrar.flush(self.id)  # its tasks are registered before it ends
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

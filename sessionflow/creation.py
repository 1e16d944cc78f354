"""Creating sessions: the part of :class:`~sessionflow.flow.SessionFlow` that makes a
new session, waits until a worker admits it, or hands back a request at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from celery import Signature
from kombu.entity import Queue
from kombu.serialization import dumps

from . import options, tokens
from . import options as opts
from .admission import Admitting
from .canvas import make_queue, sending
from .config import Config
from .context import current_session
from .enums import Reason
from .errors import (
    ConfigurationError,
    InvalidArgument,
    InvalidRecreateToken,
    NestedSessionError,
    SessionCreationTimeout,
)
from .pending import SessionRequest
from .placement import placed as is_placed
from .records import NewSession
from .registrar import Registrar
from .session import Session
from .transactions import django_on_commit

if TYPE_CHECKING:
    from .flow import SessionFlow


def creation_reply(session_id: str) -> str:
    """The result-backend id under which a waiting creator hears that its request ended
    (admitted, refused, or ended by ``complete()`` before any worker took it)."""
    return f"sessionflow.created.{session_id}"


class Creating(Admitting):
    """Creating sessions: a base of :class:`~sessionflow.flow.SessionFlow`, which
    provides what is declared here."""

    reducers: dict[str, Callable[[Any, Any], Any]]

    if TYPE_CHECKING:  # SessionFlow's parts, made on first use

        @property
        def config(self) -> Config: ...
        @property
        def signing_key(self) -> bytes: ...
        @property
        def registrar(self) -> Registrar: ...
        def ensure_watching(self) -> None: ...

    def _flow(self) -> SessionFlow:
        return cast("SessionFlow", self)  # Creating is only ever a base of SessionFlow

    def create_session(
        self,
        *,
        creation_timeout: float,
        execution_timeout: float,
        user_id: str | None = None,
        agent_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        heartbeat_timeout: float = 10,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        max_turns: int | None = None,
        survive_restart: bool = False,
        affinity: str = "hard",
        merge: str = "last_write_wins",
        reducers: dict[str, str] | None = None,
        requires: dict[str, int] | None = None,
        constraints: dict[str, Any] | None = None,
        prefer: Any = None,
        placement: str | None = None,
    ) -> Session:
        """Wait until a worker below its cap admits a new session, and return it.

        Placement (see the README's "Placement"): ``requires={"gpu": 1}`` reserves
        amounts of a worker's declared resources; ``constraints={"zone": "eu"}``
        (or ``(op, value)``) admits only workers whose labels match; ``prefer``
        ranks the workers that pass; ``placement`` is ``"spread"`` or ``"pack"``.
        Raises :class:`SessionUnplaceable` at once when no live worker could ever
        take it, :class:`SessionCreationTimeout` after ``creation_timeout`` seconds,
        :class:`BrokerError` if the broker cannot be reached (nothing is written then).
        """
        new = options.new_session(
            self.config,
            self.reducers,
            creation_timeout=creation_timeout,
            execution_timeout=execution_timeout,
            user_id=user_id,
            agent_id=agent_id,
            metadata=metadata,
            heartbeat_timeout=heartbeat_timeout,
            ttl=ttl,
            idle_timeout=idle_timeout,
            max_turns=max_turns,
            survive_restart=survive_restart,
            affinity=affinity,
            merge=merge,
            reducers=reducers,
            requires=requires,
            constraints=constraints,
            prefer=prefer,
            placement=placement,
        )
        if current_session() is not None:
            raise NestedSessionError(
                "this task already runs in a session; use current_session().apply_async() "
                "to add work to it instead of creating a session inside it"
            )
        return self._create(new)

    def recreate_session(
        self,
        token: str,
        *,
        creation_timeout: float,
        execution_timeout: float,
        user_id: str | None = None,
        agent_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        heartbeat_timeout: float = 10,
        ttl: float | None = None,
        idle_timeout: float | None = None,
        max_turns: int | None = None,
        survive_restart: bool = False,
        affinity: str = "hard",
        merge: str = "last_write_wins",
        reducers: dict[str, str] | None = None,
        requires: dict[str, int] | None = None,
        constraints: dict[str, Any] | None = None,
        prefer: Any = None,
        placement: str | None = None,
    ) -> Session:
        """A new session on the worker that held the token's session (Temporal's RecreateSession).

        Waits up to ``creation_timeout`` for a slot on that worker, then raises
        :class:`SessionCreationTimeout`. Tokens do not expire and may be used again.
        ``requires`` and ``constraints`` default to the old session's (``{}``: none);
        if that worker is live but no longer offers them, :class:`SessionUnplaceable`.
        """
        old_id, nodename = tokens.read_token(self.signing_key, token)
        new = options.new_session(
            self.config,
            self.reducers,
            creation_timeout=creation_timeout,
            execution_timeout=execution_timeout,
            user_id=user_id,
            agent_id=agent_id,
            metadata=metadata,
            heartbeat_timeout=heartbeat_timeout,
            ttl=ttl,
            idle_timeout=idle_timeout,
            max_turns=max_turns,
            survive_restart=survive_restart,
            affinity=affinity,
            merge=merge,
            reducers=reducers,
            target_worker=nodename,
            recreated_from=old_id,
            requires=requires,
            constraints=constraints,
            prefer=prefer,
            placement=placement,
        )
        old = self.store.get_session(old_id)
        if old is None or old.hostname != nodename:
            raise InvalidRecreateToken(
                "recreate token refers to a session this store does not know: was it made "
                "by another deployment?"
            )
        new = dataclasses.replace(  # what the old session asked for, unless given again
            new,
            requires=old.requires if requires is None else new.requires,
            constraints=old.constraints if constraints is None else new.constraints,
        )
        return self._create(new, make_queue(self.config.worker_creation_queue(nodename)))

    def _create(self, new: NewSession, queue: Queue | None = None) -> Session:
        """Ask for a worker and wait for it; no store write unless nobody answers.

        The request carries the whole session: the admitting worker inserts it as open
        in one statement. A client that gives up inserts it as failed instead; the
        store lets exactly one of the two inserts happen.
        """
        self._refuse_eager()
        if is_placed(new):  # requires/constraints/prefer/placement: ranked, worker by worker
            self.placer.create(new)
            self.ensure_watching()
            return Session(self._flow(), new.id)
        reply_id = creation_reply(new.id)
        self.request_admission(new.id, new.creation_timeout, queue, reply_id, new=new)
        admitted = self._await_admission(new.id, new.creation_timeout, reply_id)
        if not admitted and self.store.abandon_new(new, Reason.CREATION_TIMEOUT.value):
            self._clear_stale_requests(queue or self.creation_queue)
            raise SessionCreationTimeout(
                f"no worker admitted the session within {new.creation_timeout} s: are "
                "workers running with SessionFlow(app), and below their --max-sessions cap?"
            )
        # Admitted, or a worker admitted it between our last look and the abandon attempt.
        self.ensure_watching()
        return Session(self._flow(), new.id)

    def request_session(
        self,
        *,
        on_open: Any = None,
        on_commit: bool | Callable[[Callable[[], None]], Any] = False,
        **options: Any,
    ) -> SessionRequest:
        """Ask for a session and return at once with its handle (``.id``, ``.wait()``).

        Takes the options of :meth:`create_session`. ``on_open``: a signature the
        admitting worker sends with the session id as first argument. ``on_commit``:
        ask only when the current database transaction commits (after a rollback the id
        never exists): ``True`` for Django's, or a function that registers a callback
        with your own, e.g. ``lambda ask: after_commit(db.session, ask)`` (Flask).
        Raises :class:`BrokerError` if the broker cannot be reached (no row is written).
        """
        if not isinstance(on_commit, bool) and not callable(on_commit):
            raise InvalidArgument(
                "on_commit must be True/False or a function that runs its argument on commit"
            )
        new = self._new_session(options)
        if on_open is not None:
            if not isinstance(on_open, Signature):
                raise InvalidArgument("on_open must be a Celery signature, e.g. my_task.s()")
            on_open = dict(on_open)
            with sending(self.app, "on_open's arguments"):  # the request is JSON
                dumps(on_open, serializer="json")
        reply_id = creation_reply(new.id)

        def ask() -> None:
            # Published first: a request the broker did not take leaves no row. A worker
            # may admit it before the row is written; the row's insert then does nothing.
            self.request_admission(
                new.id, new.creation_timeout, None, reply_id, new=new, on_open=on_open
            )
            self.registrar.add_pending(new)

        if on_commit is True:
            django_on_commit(ask)
        elif callable(on_commit):
            on_commit(ask)
        else:
            ask()
        return SessionRequest(self._flow(), new, reply_id)

    async def create_session_async(self, **options: Any) -> Session:
        """``await`` a new session (asyncio, e.g. an ASGI view): like :meth:`create_session`
        without a thread per waiting caller."""
        return await self.request_session(**options).wait_async()

    def _new_session(self, options: dict[str, Any]) -> NewSession:
        self._refuse_eager()
        missing = [n for n in ("creation_timeout", "execution_timeout") if n not in options]
        if missing:
            raise InvalidArgument(f"{' and '.join(missing)} must be given (seconds)")
        internal = sorted(set(options) & set(opts.INTERNAL))
        if internal:  # set by recreate_session from a token, never by a caller
            raise InvalidArgument(
                f"unknown session option: {internal[0]!r} (to open a session on the worker "
                "of an earlier one, pass its recreate token to recreate_session)"
            )
        try:
            new = opts.new_session(self.config, self.reducers, **options)
        except TypeError as exc:
            raise InvalidArgument(f"unknown session option: {exc}") from None
        if current_session() is not None:
            raise NestedSessionError(
                "this task already runs in a session; use current_session().apply_async() "
                "to add work to it instead of creating a session inside it"
            )
        return new

    def _refuse_eager(self) -> None:
        if self.app.conf.task_always_eager:
            raise ConfigurationError(
                "sessions need a worker, and task_always_eager runs tasks in this process: "
                "in tests, start a real worker with the sessionflow.testing fixtures "
                "(sessionflow_worker) instead of eager mode"
            )

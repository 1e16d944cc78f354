"""``SessionFlow(app)``: attach sessions to a Celery app, create, find and end sessions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

from celery import Celery
from celery.backends.base import DisabledBackend
from kombu.entity import Queue

from . import canvas, limits, options
from .canvas import make_queue
from .celery_ext.tracing import Middleware
from .config import Config, load_config
from .creation import Creating, creation_reply
from .enums import SessionState, SessionStatus
from .errors import InvalidArgument, SessionNotFound
from .placer import Placer
from .queues import Queues
from .records import SessionRecord
from .registrar import Registrar
from .results import Resolver, check_backend
from .session import Session
from .store import SessionStore, open_store
from .sweeper import Sweeper, Watcher

logger = logging.getLogger("sessionflow")

_APP_ATTR = "_sessionflow"
END_REPLY_TIMEOUT = 1.0  # seconds to wait for the owning worker to confirm an end


_LISTED = (SessionState.OPEN, SessionState.CLOSED, SessionState.FAILED)


class SessionFlow(Creating):
    """Sessions for one Celery app. ``SessionFlow(app)`` is idempotent."""

    app: Celery
    middleware: list[Middleware]
    worker_nodename: str | None  # set in worker processes (celery worker -n)
    worker_closing: bool  # the worker is shutting down: admit nothing more
    reducers: dict[str, Callable[[Any, Any], Any]]
    live: Any  # the worker main process's LiveSessions (None elsewhere)
    live_dir: str | None  # the worker's live directory (inherited by pool processes)
    own_queue: str | None  # the worker's session queue
    worker_step: Any  # the SessionWorker bootstep of this worker process

    def __new__(cls, app: Celery) -> SessionFlow:
        if not isinstance(app, Celery):
            raise InvalidArgument(f"SessionFlow needs a Celery app, got {type(app).__name__}")
        existing = app.__dict__.get(_APP_ATTR)
        if isinstance(existing, cls):
            existing._install_router()  # task_routes may have been replaced since
            return existing
        self = super().__new__(cls)
        self.app = app
        self.middleware = []
        self.worker_nodename = None
        self.worker_closing = False
        self.reducers = {}
        self.live = None
        self.live_dir = None
        self.own_queue = None
        self.worker_step = None
        setattr(app, _APP_ATTR, self)
        self._install()
        return self

    def __repr__(self) -> str:
        return f"<SessionFlow of {self.app.main or 'app'}>"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a SessionFlow belongs to its process's app; call SessionFlow(app) there")

    @classmethod
    def of(cls, app: Celery) -> SessionFlow | None:
        """The SessionFlow attached to ``app``, if any."""
        if not isinstance(app, Celery):
            raise InvalidArgument(f"SessionFlow.of needs a Celery app, got {type(app).__name__}")
        flow = app.__dict__.get(_APP_ATTR)
        return flow if isinstance(flow, cls) else None

    def _install(self) -> None:
        from .celery_ext import install

        self._install_router()
        self.app.on_after_finalize.connect(lambda **_: self._install_router(), weak=False)
        install(self)

    def _install_router(self) -> None:
        routes = self.app.conf.task_routes
        if routes is None:
            routes = ()
        elif isinstance(routes, (dict, str)) or callable(routes):
            routes = (routes,)
        routes = tuple(routes)
        if canvas.route_session_task in routes:
            return
        self.app.conf.task_routes = (canvas.route_session_task, *routes)
        if "amqp" in self.app.__dict__:
            self.app.amqp.flush_routes()
            self.app.amqp.__dict__.pop("router", None)

    # -- parts, made on first use ---------------------------------------------------

    @cached_property
    def config(self) -> Config:
        """The validated ``sessionflow_*`` settings, read once (with the result backend)."""
        config = load_config(self.app.conf, getattr(self.app, "namespace", None))
        check_backend(self.app)
        return config

    @cached_property
    def store(self) -> SessionStore:
        return open_store(self.config)

    @cached_property
    def signing_key(self) -> bytes:
        """``sessionflow_secret_key``, or the key the store generated for every process."""
        if self.config.secret_key:
            return self.config.secret_key.encode()
        return self.store.secret()

    @cached_property
    def creation_queue(self) -> Queue:
        return make_queue(self.config.creation_queue)

    @cached_property
    def queues(self) -> Queues:
        return Queues(self.app, self.config)

    @cached_property
    def resolver(self) -> Resolver:
        return Resolver(self.app)

    @cached_property
    def sweeper(self) -> Sweeper:
        return Sweeper(
            self.store,
            self.queues,
            self.resolver,
            self.config,
            self.request_admission,
            place_move=self.placer.move,
        )

    @cached_property
    def placer(self) -> Placer:
        """Places sessions that ask for resources or labels (and their moves)."""
        return Placer(self)

    @cached_property
    def registrar(self) -> Registrar:
        return Registrar(self.store, self.resolver)

    @cached_property
    def session_cache(self) -> dict[str, tuple[SessionRecord, float]]:
        """Sessions this process read lately (see ``Session._open_record``)."""
        return {}

    @cached_property
    def watcher(self) -> Watcher:
        return Watcher(self.sweeper, self.config.monitor_interval)

    def ensure_watching(self) -> None:
        """Judge silent workers from this (client) process too; workers do it on their own."""
        if self.worker_nodename is None:
            self.watcher.ensure()

    # -- reducers (creating sessions: see sessionflow/creation.py) ----------------------

    def register_reducer(self, name: str, function: Callable[[Any, Any], Any]) -> None:
        """Make ``function(current, incoming) -> merged`` usable as a reducer by ``name``."""
        if not isinstance(name, str) or not name or name in options.BUILTIN_REDUCERS:
            raise InvalidArgument(
                f"reducer name must be a non-empty string other than {options.BUILTIN_REDUCERS}"
            )
        limits.text("reducer name", name, max_len=limits.MAX_SESSION_ID)
        if not callable(function):
            raise InvalidArgument(f"reducer {name!r} must be callable")
        self.reducers[name] = function

    # -- finding sessions ---------------------------------------------------------------

    def get_session(self, session_id: str) -> Session:
        """The session with this id, from any process (pending ones too, whose
        ``info.state`` is ``pending``); raises SessionNotFound."""
        limits.text("session_id", session_id)
        self.flush_requested(session_id)
        if self.store.get_session(session_id) is None:
            raise SessionNotFound(f"no session {session_id!r} in the store")
        self.ensure_watching()
        return Session(self, session_id)

    def flush_requested(self, session_id: str) -> None:
        """Write now the pending row of a session this process asked for moments ago."""
        if "registrar" in self.__dict__ and self.registrar.has_session(session_id):
            self.registrar.flush()

    def list_sessions(
        self,
        state: SessionState | str | None = None,
        user_id: str | None = None,
        hostname: str | None = None,
        agent_id: str | None = None,
    ) -> list[Session]:
        """Sessions in the store, oldest first, optionally filtered."""
        status = None
        if state is not None:
            try:
                status = SessionStatus(SessionState(state).value)
            except ValueError:
                status = None
            if status is None or status is SessionStatus.PENDING:
                raise InvalidArgument(
                    f"state must be one of {[s.value for s in _LISTED]} (sessions a worker "
                    "admitted; find a requested one with get_session(id)), got "
                    f"{limits.shown(state)}"
                )
        limits.text("user_id", user_id, optional=True)
        limits.text("hostname", hostname, optional=True)
        limits.text("agent_id", agent_id, optional=True)
        records = self.store.list_sessions(
            status=status, user_id=user_id, hostname=hostname, agent_id=agent_id
        )
        return [Session(self, record.id) for record in records]

    # -- ending sessions ----------------------------------------------------------------

    def end_session(self, session_id: str, status: SessionStatus, reason: str) -> bool:
        """Close or fail an open session, a requested one no worker admitted yet, or one
        waiting for a new worker; False if it was none of these.

        The owning worker is told at once (a control command with a reply) and
        settles the session's unstarted tasks. If it does not answer, this waits
        until its next heartbeat has seen the end (or until it counts as lost).
        A session someone else ended is not ended again (False), but this waits
        the same way until its owner has applied that end: either way, when this
        returns, no task of the session starts any more.
        """
        limits.text("session_id", session_id)
        status = limits.ending_status(status)
        limits.text("reason", reason, max_len=limits.MAX_REASON)
        self.session_cache.pop(session_id, None)
        record = self.store.get_session(session_id)
        if record is not None and record.status is SessionStatus.PENDING:
            # Asked for and not admitted yet, or waiting for a new worker: ended now, no
            # worker opens it later.
            if record.moving:
                ended = self.sweeper.end_move(session_id, status, reason)
            else:
                ended = self.store.abandon_pending(session_id, reason, status=status)
            if ended:
                self._answer_creator(session_id, status)
                return True
            record = self.store.get_session(session_id)  # a worker admitted it meanwhile
        if record is None:
            return False
        if not self.store.end_session(session_id, status, reason):
            self._await_end(session_id)
            return False
        owner = record.hostname
        if owner is None:
            return True
        if self._owned_here(owner):
            self.live.end(session_id)  # this worker holds it: settle here
            return True
        if not self._tell_owner(owner, session_id):
            self._await_owner(owner, session_id, record.heartbeat_timeout)
        return True

    def _owned_here(self, owner: str) -> bool:
        """This process is the main process of the worker ``owner``."""
        return (
            self.live is not None and self.live.in_this_process() and self.worker_nodename == owner
        )

    def _await_end(self, session_id: str) -> None:
        """Someone else ended the session: return once its owner has applied that end.

        Whoever ended it tells the owner (or the owner ended it itself); this only
        waits, as that caller does, until the session is settled or the owner's
        heartbeat is later than the end, or the owner has gone silent.
        """
        record = self.store.get_session(session_id)
        if record is None or not record.status.ended or record.settled or not record.hostname:
            return
        if self._owned_here(record.hostname):
            self.live.end(session_id)  # returns once no task of it can start here
            return
        self._await_owner(record.hostname, session_id, record.heartbeat_timeout)

    def _answer_creator(self, session_id: str, status: SessionStatus) -> None:
        """A ``request_session`` caller blocked in ``wait()`` (any process) hears of the
        end at once instead of at its creation_timeout."""
        if isinstance(self.app.backend, DisabledBackend):
            return  # waiters poll the store
        try:
            self.app.backend.store_result(
                creation_reply(session_id), {"ended": status.value}, "SUCCESS"
            )
        except Exception as exc:
            logger.info("sessionflow: could not answer the creator of %s: %s", session_id, exc)

    def _tell_owner(self, owner: str, session_id: str) -> bool:
        try:
            replies = self.app.control.broadcast(
                "sessionflow_end",
                arguments={"session_id": session_id},
                destination=[owner],
                reply=True,
                timeout=END_REPLY_TIMEOUT,
                limit=1,
            )
        except Exception as exc:  # no broker, no fanout on this transport
            logger.info("sessionflow: could not tell %s about %s: %s", owner, session_id, exc)
            return False
        return any(
            isinstance(reply, dict) and reply.get(owner, {}).get("ok") for reply in replies or ()
        )

    def _await_owner(self, owner: str, session_id: str, heartbeat_timeout: float) -> None:
        """Wait until the owner's heartbeat is later than the end (it has applied it), or
        it has gone silent (a sweeper settles the session for it)."""
        interval = self.config.heartbeat_interval
        deadline = time.monotonic() + heartbeat_timeout + 2 * interval
        while time.monotonic() < deadline:
            record = self.store.get_session(session_id, with_heartbeat=True)
            beat = None if record is None else record.last_heartbeat_at
            if record is None or record.closed_at is None or beat is None:
                return
            if beat >= record.closed_at or record.settled:
                return
            if (self.store.clock() - beat).total_seconds() > 3 * interval + 1:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Stop this process's liveness watcher and close its store connections."""
        if "watcher" in self.__dict__:
            self.watcher.stop()
        if "registrar" in self.__dict__:
            self.registrar.close()
        if "store" in self.__dict__:
            self.store.dispose()

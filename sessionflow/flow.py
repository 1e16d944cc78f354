"""``SessionFlow(app)``: attach sessions to a Celery app, create and find sessions."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from functools import cached_property
from typing import Any

from celery import Celery
from kombu.entity import Queue

from . import canvas, tokens
from .canvas import make_queue
from .celery_ext.tracing import Middleware
from .config import Config, load_config
from .context import current_session
from .errors import (
    InvalidArgument,
    InvalidRecreateToken,
    NestedSessionError,
    SessionCreationTimeout,
    SessionNotFound,
)
from .lifecycle import Lifecycle
from .session import Session, SessionState
from .store import MOVING, OPEN, PENDING, Store, utcnow

logger = logging.getLogger("sessionflow")

_APP_ATTR = "_sessionflow"
_POLL_START, _POLL_MAX = 0.001, 0.05
MERGE_POLICIES = ("last_write_wins", "raise")
BUILTIN_REDUCERS = ("append", "sum", "max", "min", "union", "merge")


class SessionFlow:
    """Sessions for one Celery app. ``SessionFlow(app)`` is idempotent."""

    app: Celery
    middleware: list[Middleware]
    worker_nodename: str | None  # set in worker processes (celery worker -n)
    worker_closing: bool  # the worker is shutting down: admit nothing more
    reducers: dict[str, Callable[[Any, Any], Any]]

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
        setattr(app, _APP_ATTR, self)
        self._install()
        return self

    @classmethod
    def of(cls, app: Celery) -> SessionFlow | None:
        """The SessionFlow attached to ``app``, if any."""
        flow = app.__dict__.get(_APP_ATTR)
        return flow if isinstance(flow, cls) else None

    def _install(self) -> None:
        from .celery_ext import install

        self._install_router()
        self.app.on_after_finalize.connect(lambda **_: self._install_router(), weak=False)
        install(self)
        from .history import install as install_state

        install_state(self)

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

    @cached_property
    def config(self) -> Config:
        """The validated ``sessionflow_*`` settings, read once."""
        return load_config(self.app.conf)

    @cached_property
    def store(self) -> Store:
        return Store(self.config)

    @cached_property
    def creation_queue(self) -> Queue:
        return make_queue(self.config.creation_queue)

    # -- sessions ---------------------------------------------------------

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
    ) -> Session:
        """Wait until a worker below its cap admits a new session, and return it.

        Raises :class:`SessionCreationTimeout` after ``creation_timeout`` seconds.
        """
        options = self._session_options(
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
        )
        if current_session() is not None:
            raise NestedSessionError(
                "this task already runs in a session; use current_session().apply_async() "
                "to add work to it instead of creating a session inside it"
            )
        return self._create(options, creation_timeout)

    def _session_options(
        self,
        *,
        creation_timeout: Any,
        execution_timeout: Any,
        user_id: Any,
        agent_id: Any,
        metadata: Any,
        heartbeat_timeout: Any,
        ttl: Any,
        idle_timeout: Any,
        max_turns: Any,
        survive_restart: Any,
        affinity: Any,
        merge: Any,
        reducers: Any,
    ) -> dict[str, Any]:
        """Validate session options into store column values; raises InvalidArgument."""
        _positive("creation_timeout", creation_timeout)
        _positive("execution_timeout", execution_timeout)
        _positive("heartbeat_timeout", heartbeat_timeout)
        if heartbeat_timeout < 2 * self.config.heartbeat_interval:
            raise InvalidArgument(
                f"heartbeat_timeout={heartbeat_timeout} must be at least twice "
                f"sessionflow_heartbeat_interval ({self.config.heartbeat_interval} s), or a "
                "healthy worker would look dead between two heartbeats"
            )
        for name, value in (("ttl", ttl), ("idle_timeout", idle_timeout)):
            if value is not None:
                _positive(name, value)
        if max_turns is not None and (
            isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1
        ):
            raise InvalidArgument(f"max_turns must be a positive whole number, got {max_turns!r}")
        if not isinstance(survive_restart, bool):
            raise InvalidArgument(f"survive_restart must be True or False, got {survive_restart!r}")
        if affinity not in ("hard", "soft"):
            raise InvalidArgument(f"affinity must be 'hard' or 'soft', got {affinity!r}")
        if merge not in MERGE_POLICIES:
            raise InvalidArgument(f"merge must be one of {MERGE_POLICIES}, got {merge!r}")
        _optional_str("user_id", user_id)
        _optional_str("agent_id", agent_id)
        return {
            "user_id": user_id,
            "agent_id": agent_id,
            "metadata": _json_dict("metadata", metadata),
            "creation_timeout": float(creation_timeout),
            "execution_timeout": float(execution_timeout),
            "heartbeat_timeout": float(heartbeat_timeout),
            "ttl": None if ttl is None else float(ttl),
            "idle_timeout": None if idle_timeout is None else float(idle_timeout),
            "max_turns": max_turns,
            "survive_restart": survive_restart,
            "affinity": affinity,
            "merge_policy": merge,
            "reducers": self._check_reducers(reducers),
        }

    def register_reducer(self, name: str, function: Callable[[Any, Any], Any]) -> None:
        """Make ``function(current, incoming) -> merged`` usable as a reducer by ``name``."""
        if not isinstance(name, str) or not name or name in BUILTIN_REDUCERS:
            raise InvalidArgument(
                f"reducer name must be a non-empty string other than {BUILTIN_REDUCERS}"
            )
        if not callable(function):
            raise InvalidArgument(f"reducer {name!r} must be callable")
        self.reducers[name] = function

    def _check_reducers(self, reducers: Any) -> dict[str, str] | None:
        if reducers is None:
            return None
        if not isinstance(reducers, dict) or not all(isinstance(k, str) for k in reducers):
            raise InvalidArgument("reducers must be a dict of state key -> reducer name")
        for key, name in reducers.items():
            if name not in BUILTIN_REDUCERS and name not in self.reducers:
                raise InvalidArgument(
                    f"unknown reducer {name!r} for key {key!r}: use one of {BUILTIN_REDUCERS} "
                    "or register it with flow.register_reducer(name, function) in every process"
                )
        return dict(reducers)

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
    ) -> Session:
        """A new session on the worker that held the token's session (Temporal's RecreateSession).

        Waits up to ``creation_timeout`` for a slot on that worker, then raises
        :class:`SessionCreationTimeout`.
        """
        old_id, nodename = tokens.read_token(self.config.secret_key, token)
        options = self._session_options(
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
        )
        old = self.store.get_session(old_id)
        if old is None or old["hostname"] != nodename:
            raise InvalidRecreateToken(
                "recreate token refers to a session this store does not know: was it made "
                "by another deployment?"
            )
        options.update(target_worker=nodename, recreated_from=old_id)
        queue = make_queue(self.config.worker_creation_queue(nodename))
        return self._create(options, creation_timeout, queue)

    def _create(
        self, options: dict[str, Any], creation_timeout: float, queue: Queue | None = None
    ) -> Session:
        session_id = str(uuid.uuid4())
        self.store.create_pending({"id": session_id, "created_at": utcnow(), **options})
        self.request_admission(session_id, creation_timeout, queue)
        self._await_admission(session_id, creation_timeout)
        self.lifecycle.ensure_watching()
        return Session(self, session_id)

    def request_admission(
        self, session_id: str, creation_timeout: float | None = None, queue: Queue | None = None
    ) -> None:
        """Ask the workers (or the one of ``queue``) to admit a pending session."""
        queue = queue or self.creation_queue
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                {"session_id": session_id},
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                serializer="json",
                retry=True,
                retry_policy={"max_retries": 3},
                expiration=creation_timeout,
            )

    def _await_admission(self, session_id: str, creation_timeout: float) -> None:
        deadline = time.monotonic() + creation_timeout
        delay = _POLL_START
        while True:
            status = self.store.get_status(session_id)
            if status == OPEN:
                return
            if status != PENDING:
                raise SessionCreationTimeout(f"session {session_id} was abandoned ({status})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)
        if self.store.abandon_pending(session_id, "creation_timeout"):
            raise SessionCreationTimeout(
                f"no worker admitted the session within {creation_timeout} s: are workers "
                "running with SessionFlow(app), and below their --max-sessions cap?"
            )
        # A worker admitted it between our last look and the abandon attempt.

    def get_session(self, session_id: str) -> Session:
        """The session with this id, from any process; raises SessionNotFound."""
        if not isinstance(session_id, str) or not session_id:
            raise InvalidArgument("session_id must be a non-empty string")
        row = self.store.get_session(session_id)
        if row is None or (row["status"] == PENDING and row["reason"] != MOVING):
            raise SessionNotFound(f"no session {session_id!r} in the store")
        self.lifecycle.ensure_watching()
        return Session(self, session_id)

    def list_sessions(
        self,
        state: SessionState | str | None = None,
        user_id: str | None = None,
        hostname: str | None = None,
    ) -> list[Session]:
        """Sessions in the store, oldest first, optionally filtered."""
        status = None
        if state is not None:
            try:
                status = SessionState(state).value
            except ValueError:
                raise InvalidArgument(
                    f"state must be one of {[s.value for s in SessionState]}, got {state!r}"
                ) from None
        _optional_str("user_id", user_id)
        _optional_str("hostname", hostname)
        rows = self.store.list_sessions(status, user_id, hostname)
        return [Session(self, row["id"]) for row in rows]

    # -- ending sessions --------------------------------------------------

    def end_session(self, session_id: str, status: str, reason: str) -> bool:
        """Close or fail an open session and resolve its unstarted tasks; False if not open."""
        ended = self.store.end_session(session_id, status, reason)
        if ended is None:
            return False
        self.lifecycle.resolve(ended)
        return True

    @cached_property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self)

    def close(self) -> None:
        """Stop this process's liveness watcher and close its store connections."""
        if "lifecycle" in self.__dict__:
            self.lifecycle.stop_watching()
        if "store" in self.__dict__:
            self.store.dispose()


def _positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidArgument(f"{name} must be a positive number of seconds, got {value!r}")


def _optional_str(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidArgument(f"{name} must be a non-empty string or None, got {value!r}")


def _json_dict(name: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{name} must be a dict of JSON values, got {type(value).__name__}")
    try:
        return dict(json.loads(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{name} must hold only JSON values: {exc}") from None

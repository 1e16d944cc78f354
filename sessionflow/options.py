"""Validation of ``create_session`` options into a :class:`NewSession`, before any write."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from . import limits, resources
from .config import Config
from .errors import InvalidArgument
from .records import NewSession, utcnow
from .state import TEMP, scope_of

MERGE_POLICIES = ("last_write_wins", "raise")
BUILTIN_REDUCERS = ("append", "sum", "max", "min", "union", "merge")
AFFINITIES = ("hard", "soft")
# new_session options only recreate_session sets (from a verified token).
INTERNAL = ("target_worker", "recreated_from")


def new_session(
    config: Config,
    registered_reducers: dict[str, Callable[[Any, Any], Any]],
    *,
    creation_timeout: Any,
    execution_timeout: Any,
    user_id: Any = None,
    agent_id: Any = None,
    metadata: Any = None,
    heartbeat_timeout: Any = 10,
    ttl: Any = None,
    idle_timeout: Any = None,
    max_turns: Any = None,
    survive_restart: Any = False,
    affinity: Any = "hard",
    merge: Any = "last_write_wins",
    reducers: Any = None,
    target_worker: str | None = None,
    recreated_from: str | None = None,
    requires: Any = None,
    constraints: Any = None,
    prefer: Any = None,
    placement: Any = None,
) -> NewSession:
    """A validated pending session; raises InvalidArgument naming the bad option.

    ``requires``, ``constraints``, ``prefer`` and ``placement`` are the placement
    options (see :mod:`sessionflow.resources`), kept in canonical form.
    """
    creation = limits.seconds("creation_timeout", creation_timeout)
    execution = limits.seconds("execution_timeout", execution_timeout)
    heartbeat = limits.seconds("heartbeat_timeout", heartbeat_timeout)
    assert creation is not None and execution is not None and heartbeat is not None
    if heartbeat < 2 * config.heartbeat_interval:
        raise InvalidArgument(
            f"heartbeat_timeout={heartbeat_timeout} must be at least twice "
            f"sessionflow_heartbeat_interval ({config.heartbeat_interval} s), or a "
            "healthy worker would look dead between two heartbeats"
        )
    if not isinstance(survive_restart, bool):
        raise InvalidArgument(f"survive_restart must be True or False, got {survive_restart!r}")
    if affinity not in AFFINITIES:
        raise InvalidArgument(f"affinity must be 'hard' or 'soft', got {limits.shown(affinity)}")
    if merge not in MERGE_POLICIES:
        raise InvalidArgument(f"merge must be one of {MERGE_POLICIES}, got {limits.shown(merge)}")
    meta = None
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidArgument(
                f"metadata must be a dict of JSON values, got {type(metadata).__name__}"
            )
        meta, _ = limits.json_document("metadata", metadata, max_bytes=config.state_max_value_bytes)
    return NewSession(
        id=str(uuid.uuid4()),
        created_at=utcnow(),
        creation_timeout=creation,
        execution_timeout=execution,
        heartbeat_timeout=heartbeat,
        user_id=limits.text("user_id", user_id, optional=True),
        agent_id=limits.text("agent_id", agent_id, optional=True),
        metadata=meta,
        ttl=limits.seconds("ttl", ttl, optional=True),
        idle_timeout=limits.seconds("idle_timeout", idle_timeout, optional=True),
        max_turns=limits.whole("max_turns", max_turns, minimum=1, optional=True),
        survive_restart=survive_restart,
        affinity=affinity,
        merge_policy=merge,
        reducers=check_reducers(reducers, registered_reducers),
        target_worker=target_worker,
        recreated_from=recreated_from,
        requires=resources.requires(requires),
        constraints=resources.constraints(constraints),
        prefer=resources.prefer(prefer),
        placement=resources.placement(placement),
    )


def check_reducers(
    reducers: Any, registered: dict[str, Callable[[Any, Any], Any]]
) -> dict[str, str] | None:
    if reducers is None:
        return None
    if not isinstance(reducers, dict):
        raise InvalidArgument("reducers must be a dict of state key -> reducer name")
    for key, name in reducers.items():
        limits.text("a reducers key", key)
        try:
            temp = scope_of(key) == TEMP
        except InvalidArgument as exc:  # a key that can never be used, e.g. "temp:"
            raise InvalidArgument(f"reducers key {key!r}: {exc}") from None
        if temp:
            raise InvalidArgument(
                f"reducers key {key!r}: temp: keys live for one task and are never merged"
            )
        if not isinstance(name, str) or (name not in BUILTIN_REDUCERS and name not in registered):
            raise InvalidArgument(
                f"unknown reducer {limits.shown(name)} for key {key!r}: use one of "
                f"{BUILTIN_REDUCERS} or register it with flow.register_reducer(name, function) "
                "in every process"
            )
    return dict(reducers)

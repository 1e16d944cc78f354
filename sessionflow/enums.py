"""The named values sessionflow stores and compares: statuses and end reasons.

Every status is a ``str`` enum, so it compares equal to the text in the store
and in JSON (``SessionStatus.OPEN == "open"``), as ``celery.states`` and arq's
``JobStatus`` do.
"""

from __future__ import annotations

from enum import Enum


class SessionStatus(str, Enum):
    """Where a session is in its life, as the store records it."""

    PENDING = "pending"  # waiting for a worker to admit it (or to take it over: MOVING)
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (SessionStatus.CLOSED, SessionStatus.FAILED)


class SessionState(str, Enum):
    """Lifecycle state of a session as users see it (``SessionInfo.state``)."""

    PENDING = "pending"
    OPEN = "open"
    FAILED = "failed"
    CLOSED = "closed"


class TaskStatus(str, Enum):
    """What became of a task sent through a session."""

    PENDING = "pending"  # registered, not started (or waiting to be retried)
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its session ended before it started; it never runs
    LOST = "lost"  # it was running when its worker process died


class WorkerStatus(str, Enum):
    """A worker's own last word about itself."""

    ONLINE = "online"
    OFFLINE = "offline"  # it shut down warmly


class Reason(str, Enum):
    """Why a session ended (``SessionInfo.reason``), or why it is pending."""

    COMPLETED = "completed"
    EXECUTION_TIMEOUT = "execution_timeout"
    TTL = "ttl"
    IDLE_TIMEOUT = "idle_timeout"
    CREATION_TIMEOUT = "creation_timeout"
    WORKER_LOST = "worker_lost"
    WORKER_SHUTDOWN = "worker_shutdown"
    MOVING = "moving"  # a pending session changing workers (soft affinity)
    WORKER_CHANGED = "worker_changed"  # restarted with capacities or labels it no longer fits
    UNPLACEABLE = "unplaceable"  # no live worker could take it (request_session)


#: Celery states of a finished execution, and what they make of the task.
RUN_FINAL_STATES = {
    "SUCCESS": TaskStatus.SUCCEEDED,
    "IGNORED": TaskStatus.SUCCEEDED,
    "FAILURE": TaskStatus.FAILED,
    "REJECTED": TaskStatus.FAILED,
    "REVOKED": TaskStatus.FAILED,
}
#: A run that is still going (its end is not recorded yet).
RUN_STARTED = "STARTED"
#: A run that ended because its worker process died.
RUN_LOST = "LOST"

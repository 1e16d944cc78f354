"""Every error sessionflow raises derives from :class:`SessionFlowError`.

Errors that travel through a Celery result backend are rebuilt on the caller's
side as ``cls(*args)``, so each class keeps its constructor arguments in
``args`` and accepts them back positionally.
"""

from __future__ import annotations


class SessionFlowError(Exception):
    """Root of every sessionflow error."""


class ConfigurationError(SessionFlowError):
    """A ``sessionflow_*`` setting or the worker option is missing or invalid."""


class InvalidArgument(SessionFlowError, ValueError):
    """A public call got an argument it cannot use; nothing was changed."""


class InvalidRecreateToken(InvalidArgument):
    """A recreate token is malformed, tampered with, or signed with another key."""


class NodeNameInUse(ConfigurationError):
    """A live worker already runs under this node name; start this one with another ``-n``."""


class StoreError(SessionFlowError):
    """The session store cannot be reached or its schema is not ready."""


class StoreRefused(StoreError):
    """The session store was reached but refused this write (a constraint it breaks, e.g.
    a row of a session that no longer exists); trying the same write again will not help."""


class BrokerError(SessionFlowError):
    """The broker could not be reached (or refused the message); nothing was sent."""


class SessionCreationTimeout(SessionFlowError):
    """No worker admitted the session within ``creation_timeout`` seconds."""


class SessionStillPending(SessionFlowError):
    """``SessionRequest.wait(timeout)`` ran out before a worker admitted the session; it may
    still be admitted until its ``creation_timeout``."""


class SessionUnplaceable(SessionFlowError):
    """No live worker declares the capacities or labels a session asks for; nothing waits."""


class NestedSessionError(SessionFlowError):
    """A session was created from a task that already runs in an open session."""


class SessionNotFound(SessionFlowError):
    """No session with this id exists in the store."""


class SessionEnded(SessionFlowError):
    """Base of the errors for work sent to, or left in, a session that has ended."""

    def __init__(self, message: str, session_id: str = "", reason: str = "") -> None:
        super().__init__(message, session_id, reason)
        self.session_id = session_id
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


class SessionClosed(SessionEnded):
    """The session was completed (or timed out); its unstarted tasks do not run."""


class SessionFailed(SessionEnded):
    """The session failed (e.g. its worker was lost); ``reason`` says why."""


class StateValueError(SessionFlowError, ValueError):
    """A state value is not JSON, or exceeds a size limit; nothing was written."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message, key)
        self.key = key

    def __str__(self) -> str:
        return str(self.args[0])


class StateConflict(SessionFlowError):
    """A state write lost a race (``keys`` changed since read) or branches conflicted."""

    def __init__(self, message: str, keys: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message, list(keys))
        self.keys = list(keys)

    def __str__(self) -> str:
        return str(self.args[0])


class SessionTaskLost(SessionFailed):
    """The task was running when its worker process died; it did not finish."""


class SessionTaskRefused(SessionFlowError):
    """A message claimed a session it was not sent for, or reached a worker that does not
    hold that session; it did not run."""

    def __init__(self, message: str, session_id: str = "") -> None:
        super().__init__(message, session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return str(self.args[0])


class TurnLimitExceeded(SessionFlowError):
    """Sending these tasks would take the session past its ``max_turns``."""


def ended_error(session_id: str, status: str | None, reason: str | None) -> SessionFlowError:
    """The error for work sent to, or left in, a session that is not open."""
    if status == "failed":
        return SessionFailed(
            f"session {session_id} failed ({reason}); create a new session to continue",
            session_id,
            reason or "unknown",
        )
    if status == "closed":
        return SessionClosed(
            f"session {session_id} is closed ({reason}); create a new session to continue",
            session_id,
            reason or "completed",
        )
    if status == "pending":
        return SessionStillPending(
            f"session {session_id} is still waiting for a worker; send its tasks once "
            "request.wait() has returned it (or use create_session, which waits)"
        )
    return SessionNotFound(f"no session {session_id!r} in the store")

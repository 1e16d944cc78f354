"""sessionflow: Temporal-style worker sessions for Celery."""

from .context import current_session
from .errors import (
    ConfigurationError,
    InvalidArgument,
    InvalidRecreateToken,
    NestedSessionError,
    SessionClosed,
    SessionCreationTimeout,
    SessionEnded,
    SessionFailed,
    SessionFlowError,
    SessionNotFound,
    SessionTaskLost,
    StateConflict,
    StateValueError,
    StoreError,
    TurnLimitExceeded,
)
from .flow import SessionFlow
from .history import RunRecord
from .session import Session, SessionInfo, SessionState
from .state import State

__version__ = "0.1.0"

__all__ = [
    # client
    "Session",
    "SessionFlow",
    "SessionInfo",
    "SessionState",
    "current_session",
    # state and history
    "RunRecord",
    "State",
    # errors
    "ConfigurationError",
    "InvalidArgument",
    "InvalidRecreateToken",
    "NestedSessionError",
    "SessionClosed",
    "SessionCreationTimeout",
    "SessionEnded",
    "SessionFailed",
    "SessionFlowError",
    "SessionNotFound",
    "SessionTaskLost",
    "StateConflict",
    "StateValueError",
    "StoreError",
    "TurnLimitExceeded",
]

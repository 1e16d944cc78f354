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
    StoreError,
)
from .flow import SessionFlow
from .session import Session, SessionInfo, SessionState

__version__ = "0.1.0"

__all__ = [
    # client
    "Session",
    "SessionFlow",
    "SessionInfo",
    "SessionState",
    "current_session",
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
    "StoreError",
]

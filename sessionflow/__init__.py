"""sessionflow: Temporal-style worker sessions for Celery."""

import importlib.metadata as _metadata

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

try:  # the installed distribution's metadata: the one version pyproject.toml sets
    __version__: str = _metadata.version("sessionflow")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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

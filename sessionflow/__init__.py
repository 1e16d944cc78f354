"""sessionflow: Temporal-style worker sessions for Celery."""

import importlib.metadata as _metadata

from .canvas import detached
from .context import current_session
from .enums import SessionState
from .errors import (
    BrokerError,
    ConfigurationError,
    InvalidArgument,
    InvalidRecreateToken,
    NestedSessionError,
    NodeNameInUse,
    SessionClosed,
    SessionCreationTimeout,
    SessionEnded,
    SessionFailed,
    SessionFlowError,
    SessionNotFound,
    SessionStillPending,
    SessionTaskLost,
    SessionTaskRefused,
    SessionUnplaceable,
    StateConflict,
    StateValueError,
    StoreError,
    StoreRefused,
    TurnLimitExceeded,
)
from .flow import SessionFlow
from .pending import SessionRequest
from .records import RunRecord
from .session import Session, SessionInfo
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
    "SessionRequest",
    "SessionState",
    "current_session",
    "detached",
    # state and history
    "RunRecord",
    "State",
    # errors
    "BrokerError",
    "ConfigurationError",
    "InvalidArgument",
    "InvalidRecreateToken",
    "NestedSessionError",
    "NodeNameInUse",
    "SessionClosed",
    "SessionCreationTimeout",
    "SessionEnded",
    "SessionFailed",
    "SessionFlowError",
    "SessionNotFound",
    "SessionStillPending",
    "SessionTaskLost",
    "SessionTaskRefused",
    "SessionUnplaceable",
    "StateConflict",
    "StateValueError",
    "StoreError",
    "StoreRefused",
    "TurnLimitExceeded",
]

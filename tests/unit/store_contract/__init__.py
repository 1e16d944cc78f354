"""The contract of :class:`~sessionflow.store.base.SessionStore`, once for every backend.

``StoreContract`` holds the tests, one module per part of the store; a backend's
test class (see ``test_store.py``) derives from it and provides a ``store``
fixture giving an empty store. Each test checks a rule the docstrings of
``sessionflow/store/base.py`` state. Races use real threads on every backend:
the store's conditional transitions, not timing, must decide them.
"""

from .branches import BranchesContract
from .helpers import NODE, NODE2, QUEUE, QUEUE2, opened, pending, run, send, statuses_of
from .placement import PlacementContract
from .races import RacesContract
from .runs import RunsContract
from .sessions import SessionsContract
from .state import StateContract
from .tasks import TasksContract
from .workers import WorkersContract


class StoreContract(
    SessionsContract,
    TasksContract,
    RunsContract,
    WorkersContract,
    StateContract,
    BranchesContract,
    RacesContract,
    PlacementContract,
):
    """Every backend of the session store passes these; subclasses provide ``store``."""


__all__ = [
    "NODE",
    "NODE2",
    "QUEUE",
    "QUEUE2",
    "StoreContract",
    "opened",
    "pending",
    "run",
    "send",
    "statuses_of",
]

"""An in-memory :class:`~sessionflow.store.base.SessionStore` for tests: the SQL store's
semantics (return values, errors, conditional transitions) behind one lock.

Every method takes the lock for its whole run, as a SQL transaction would: a
conditional transition (pending → open, open → closed) decides a race here too.
Time comes from ``clock`` (default :func:`~sessionflow.records.utcnow`), so a test
can move it forward to expire leases or age heartbeats.

One module per part, as in :mod:`sessionflow.store.sql`: ``sessions``, ``tasks``,
``workers``, ``state``, ``branches`` and ``retention`` hold mixins over the rows of
``_data``; :class:`MemoryStore` combines them.
"""

from __future__ import annotations

from ..base import SessionStore
from ..sql.migrate import head_revision
from .branches import BranchesMemory
from .retention import RetentionMemory
from .sessions import SessionsMemory
from .state import StateMemory
from .tasks import TasksMemory
from .workers import WorkersMemory


class MemoryStore(
    SessionsMemory,
    TasksMemory,
    WorkersMemory,
    StateMemory,
    BranchesMemory,
    RetentionMemory,
    SessionStore,
):
    """:class:`~sessionflow.store.base.SessionStore` in this process's memory.

    ``clock`` stamps everything (heartbeats, ends, leases); pass one to move time by hand.
    """

    dialect = "memory"

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._sessions)} sessions>"

    def upgrade(self) -> str:
        return head_revision()

    def revision(self) -> str | None:
        return self.upgrade()

    def dispose(self) -> None:
        """Nothing to close: the data stays."""


__all__ = ["MemoryStore"]

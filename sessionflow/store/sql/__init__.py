"""The SQL store (SQLite, PostgreSQL): every SQL statement of sessionflow lives here."""

from __future__ import annotations

from ...config import Config
from ..base import SessionStore
from .branches import BranchesSQL
from .engine import Engines
from .retention import RetentionSQL
from .runs import RunsSQL
from .sessions import SessionsSQL
from .settlement import SettlementSQL
from .state import StateSQL
from .tasks import TasksSQL
from .workers import WorkersSQL


class SQLStore(
    SessionsSQL,
    TasksSQL,
    SettlementSQL,
    RunsSQL,
    WorkersSQL,
    StateSQL,
    BranchesSQL,
    RetentionSQL,
    SessionStore,
):
    """:class:`~sessionflow.store.base.SessionStore` on SQLAlchemy 2.x."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dialect = config.dialect
        self.engines = Engines(config)

    def __repr__(self) -> str:
        return f"<SQLStore {self.config.masked_url}>"

    def upgrade(self) -> str:
        return self.engines.upgrade()

    def revision(self) -> str | None:
        return self.engines.revision()

    def dispose(self) -> None:
        self.engines.dispose()


__all__ = ["SQLStore"]

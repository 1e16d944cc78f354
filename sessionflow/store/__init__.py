"""The session store: a typed contract (:class:`SessionStore`) and its backends."""

from __future__ import annotations

from ..config import Config
from .base import BranchStart, Merger, SessionStore, StateWrite


def open_store(config: Config) -> SessionStore:
    """The store ``config.database_url`` names."""
    from .sql import SQLStore

    return SQLStore(config)


__all__ = ["BranchStart", "Merger", "SessionStore", "StateWrite", "open_store"]

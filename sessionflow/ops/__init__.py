"""What the operator's commands do, as functions that return plain, JSON-ready dicts.

``celery -A proj sessions ...`` (:mod:`sessionflow.celery_cli`) calls these and
renders their result as a table, or as JSON with ``--json``; scripts can call them
too. None of them starts a thread or creates a store that does not exist yet.
"""

from __future__ import annotations

from .fleet import ask_workers as ask_workers
from .fleet import worker_status as worker_status
from .fleet import workers
from .sessions import STATES, end_sessions, list_sessions, session_dict, show_session
from .stores import (
    StoreNotConfigured,
    db_current,
    db_upgrade,
    existing_store,
    prune,
    store_config,
)
from .stores import configured_url as configured_url
from .stores import default_store_hint as default_store_hint
from .values import age, iso, parse_duration
from .values import json_size as json_size

# The `name as name` imports: helpers importable from sessionflow.ops as before the
# split, left out of __all__ as they were.
__all__ = [
    "STATES",
    "StoreNotConfigured",
    "age",
    "db_current",
    "db_upgrade",
    "end_sessions",
    "existing_store",
    "iso",
    "list_sessions",
    "parse_duration",
    "prune",
    "session_dict",
    "show_session",
    "store_config",
    "workers",
]

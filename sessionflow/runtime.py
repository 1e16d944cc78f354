"""The session task executing in this thread (set by the worker's tracer)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskRun:
    """One execution of a session task in this process."""

    session_id: str
    task_id: str
    task_name: str
    worker: str
    request: dict[str, Any]
    queue: str = ""  # the session's queue now (it changes when a session moves)
    extra: dict[str, Any] = field(default_factory=dict)
    flow: Any = None  # the SessionFlow of the worker running it


_current = threading.local()


def current_run() -> TaskRun | None:
    """The session task executing in this thread, if any."""
    return getattr(_current, "run", None)


def set_current_run(run: TaskRun | None) -> None:
    _current.run = run

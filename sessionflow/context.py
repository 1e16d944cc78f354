"""``current_session()``: the session a running task belongs to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .runtime import current_run

if TYPE_CHECKING:
    from .session import Session


def current_session_id() -> str | None:
    """The id of the session the task running in this thread belongs to, if any.

    Only a task the worker admitted into its session has one: a message that merely
    carries session headers (forged, or run eagerly) does not.
    """
    run = current_run()
    return run.session_id if run is not None else None


def current_session() -> Session | None:
    """Inside a task: the :class:`Session` it runs in; otherwise None."""
    run = current_run()
    if run is None or run.flow is None:
        return None
    from .session import Session

    return Session(run.flow, run.session_id)

"""``current_session()``: the session a running task belongs to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import current_task

from .canvas import SESSION_HEADER

if TYPE_CHECKING:
    from .session import Session


def current_session_id() -> str | None:
    """The session id carried by the running task's message, if any."""
    task = current_task
    if task is None or not task:
        return None
    request = task.request
    if request is None or request.called_directly:
        return None
    session_id = getattr(request, SESSION_HEADER, None)
    if session_id is None:
        session_id = (getattr(request, "headers", None) or {}).get(SESSION_HEADER)
    return session_id if isinstance(session_id, str) else None


def current_session() -> Session | None:
    """Inside a task: the :class:`Session` it runs in; otherwise None."""
    session_id = current_session_id()
    if session_id is None:
        return None
    from .flow import SessionFlow
    from .session import Session

    flow = SessionFlow.of(current_task.app)
    if flow is None:
        return None
    return Session(flow, session_id)

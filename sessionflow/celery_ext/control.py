"""Remote-control commands a worker answers (registered on import, in every process:
Celery checks command names on the client side too)."""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command

from ..limits import MAX_SESSION_ID


def _live(state: Any) -> Any:
    from ..flow import SessionFlow

    flow = SessionFlow.of(state.consumer.app)
    return None if flow is None else flow.live


@control_command(  # type: ignore[untyped-decorator]
    args=[("session_id", str)],
    signature="<session_id>",
    help="sessionflow: settle a session that ended in the store (no task of it starts after)",
)
def sessionflow_end(state: Any, session_id: str) -> dict[str, Any]:
    """The owner of an ended session stops its tasks from starting and settles it."""
    live = _live(state)
    if live is None or not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID:
        return {"ok": False, "error": "this worker holds no such session"}
    held = live.get(session_id) is not None
    live.end(session_id)
    return {"ok": True, "held": held}

"""The "202 + poll" flow: POST answers at once, a worker builds the report, GET polls."""

from __future__ import annotations

from flask import Blueprint, abort, request, url_for
from flask.typing import ResponseReturnValue

from sessionflow import SessionNotFound
from sessionflow.contrib.flask import after_commit, get_flow

from .extensions import db
from .models import Report
from .tasks import start_report

bp = Blueprint("reports", __name__)


@bp.post("/reports")
def create_report() -> ResponseReturnValue:
    """Create a report and ask for a session to build it; answer 202 without waiting."""
    title = (request.form.get("title") or "").strip()
    report = Report(title=title or "untitled")
    db.session.add(report)
    db.session.flush()  # the report's id, for the task the session starts with
    report_id = report.id  # read now: after the commit the object is expired
    pending = get_flow().request_session(
        creation_timeout=30,
        execution_timeout=300,
        user_id="anonymous",
        metadata={"report": report_id},
        on_open=start_report.s(report_id),  # sent by the worker that takes the session
        # Asked for only when this transaction commits; a rollback forgets it, and the
        # id (known now) never exists.
        on_commit=lambda ask: after_commit(db.session, ask),
    )
    report.session_id = pending.id
    if not title:
        db.session.rollback()  # the report and the session request go away together
        return {"error": "a title is required"}, 400
    db.session.commit()
    url = url_for("reports.report_status", report_id=report_id)
    body = {"id": report_id, "session_id": pending.id, "status": Report.QUEUED, "url": url}
    return body, 202, {"Location": url}


@bp.get("/reports/<int:report_id>")
def report_status(report_id: int) -> ResponseReturnValue:
    """The report and its session, for polling."""
    report = db.session.get(Report, report_id) or abort(404)
    session: dict[str, object] = {"id": report.session_id or None, "state": "unknown"}
    try:
        # Not in the store: asking failed after the commit (the broker was down).
        info = get_flow().get_session(report.session_id).info if report.session_id else None
    except SessionNotFound:
        info = None
    if info is not None:
        session.update(state=info.state.value, worker=info.hostname or None, reason=info.reason)
    return {**report.to_dict(), "session": session}

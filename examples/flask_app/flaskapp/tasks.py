"""The report's steps: both run on the session's worker, the second reads what the first
left on that worker's local disk. Each task runs inside the app context (``FlaskTask``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from celery import chain, shared_task
from flask import current_app
from sqlalchemy import update

from sessionflow.contrib.flask import get_flow

from .extensions import db
from .models import Report


def local_disk(hostname: str) -> Path:
    """This worker's scratch folder: stands in for a disk only that machine has."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", hostname)
    folder = Path(current_app.config["REPORTS_DATA"]) / "workers" / safe
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def set_report(report_id: int, **values: Any) -> None:
    db.session.execute(update(Report).where(Report.id == report_id).values(**values))
    db.session.commit()


@shared_task
def start_report(session_id: str, report_id: int) -> str:
    """``on_open``: the worker that admitted the session sends it with the session's id."""
    set_report(report_id, status=Report.RUNNING)
    session = get_flow().get_session(session_id)
    # Both steps on the session's worker; the session completes when the chain is done.
    session.apply_async(chain(gather.si(report_id), render.s(report_id)), complete_when_done=True)
    return session_id


@shared_task(bind=True)
def gather(self, report_id: int) -> str:  # type: ignore[no-untyped-def]
    """Step 1: write the report's raw data to this worker's local disk."""
    report = db.session.get_one(Report, report_id)
    path = local_disk(self.request.hostname) / f"report-{report_id}.txt"
    path.write_text(f"{report.title}: 3 rows\n")
    return str(path)


@shared_task(bind=True)
def render(self, path: str, report_id: int) -> str:  # type: ignore[no-untyped-def]
    """Step 2: read the local file; it exists only on the worker that ran step 1."""
    text = Path(path).read_text().strip()
    set_report(report_id, status=Report.DONE, result=text.upper(), worker=self.request.hostname)
    return text

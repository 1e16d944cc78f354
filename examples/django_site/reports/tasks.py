"""The report's steps: both run on the session's worker, the second reads what the first
left on that worker's local disk."""

from __future__ import annotations

import re
from pathlib import Path

from celery import chain, shared_task
from django.conf import settings

from reports.models import Report
from sessionflow.contrib.django import get_flow


def local_disk(hostname: str) -> Path:
    """This worker's scratch folder: stands in for a disk only that machine has."""
    folder = Path(settings.DATA) / "workers" / re.sub(r"[^A-Za-z0-9_.-]", "_", hostname)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@shared_task
def start_report(session_id: str, report_id: int) -> str:
    """``on_open``: the worker that admitted the session sends it with the session's id."""
    Report.objects.filter(pk=report_id).update(status=Report.RUNNING)
    session = get_flow().get_session(session_id)
    # Both steps on the session's worker; the session completes when the chain is done.
    session.apply_async(chain(gather.si(report_id), render.s(report_id)), complete_when_done=True)
    return session_id


@shared_task(bind=True)
def gather(self, report_id: int) -> str:  # type: ignore[no-untyped-def]
    """Step 1: write the report's raw data to this worker's local disk."""
    report = Report.objects.get(pk=report_id)
    path = local_disk(self.request.hostname) / f"report-{report_id}.txt"
    path.write_text(f"{report.title}: 3 rows\n")
    return str(path)


@shared_task(bind=True)
def render(self, path: str, report_id: int) -> str:  # type: ignore[no-untyped-def]
    """Step 2: read the local file; it exists only on the worker that ran step 1."""
    text = Path(path).read_text().strip()
    Report.objects.filter(pk=report_id).update(
        status=Report.DONE, result=text.upper(), worker=self.request.hostname
    )
    return text

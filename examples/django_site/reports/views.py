"""The "202 + poll" flow: POST answers at once, a worker builds the report, GET polls."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from reports.models import Report
from reports.tasks import start_report
from sessionflow import SessionNotFound
from sessionflow.contrib.django import get_flow


@csrf_exempt
@require_POST
def create_report(request: HttpRequest) -> JsonResponse:
    """Create a report and ask for a session to build it; answer 202 without waiting."""
    title = (request.POST.get("title") or "").strip()
    with transaction.atomic():
        report = Report.objects.create(title=title or "untitled")
        pending = get_flow().request_session(
            creation_timeout=30,
            execution_timeout=300,
            user_id=request.user.get_username() or "anonymous",
            metadata={"report": report.pk},
            on_open=start_report.s(report.pk),  # sent by the worker that takes the session
            on_commit=True,  # nothing is written or sent unless this transaction commits
        )
        report.session_id = pending.id
        report.save(update_fields=["session_id"])
        if not title:
            # The report and the session request go away together: the id never exists.
            transaction.set_rollback(True)
            return JsonResponse(
                {"error": "a title is required", "session_id": pending.id}, status=400
            )
    url = reverse("report", args=[report.pk])
    body = {"id": report.pk, "session_id": pending.id, "status": report.status, "url": url}
    return JsonResponse(body, status=202, headers={"Location": url})


@require_GET
def report_status(request: HttpRequest, report_id: int) -> JsonResponse:
    """The report and its session, for polling."""
    report = get_object_or_404(Report, pk=report_id)
    session: dict[str, object] = {"id": report.session_id, "state": "unknown"}
    try:
        info = get_flow().get_session(report.session_id).info
    except SessionNotFound:
        pass
    else:
        session.update(state=info.state.value, worker=info.hostname or None, reason=info.reason)
    return JsonResponse(
        {
            "id": report.pk,
            "title": report.title,
            "status": report.status,
            "result": report.result,
            "worker": report.worker,
            "session": session,
        }
    )

"""A read-only admin for sessions: list, filter, inspect, and end them.

Sessions are read from the ``DATABASES`` entry that holds the store
(``SESSIONFLOW["DATABASE"]``); a store given only by URL has no admin. Nothing can
be added, changed or deleted here; the ``complete`` and ``fail`` actions end open
sessions the way ``celery sessions complete|fail`` does (the owning worker is told),
for users with the ``sessionflow.end_session`` permission.
"""

from __future__ import annotations

import json
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any

from django.contrib import admin, messages
from django.utils import timezone
from django.utils.html import format_html

from ... import ops
from ...enums import Reason, SessionStatus
from ...errors import SessionFlowError
from .conf import get_flow, user_settings
from .models import Run, Session, SessionTask, Worker

_FAIL_REASON = "failed from the admin"


def store_alias() -> str | None:
    """The ``DATABASES`` alias of the store, if the store lives in one."""
    try:
        alias = user_settings().get("DATABASE")
    except SessionFlowError:
        return None
    return alias if isinstance(alias, str) else None


class ReadOnly:
    """No adding, changing or deleting; everything is read from the store's database."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: Any) -> Any:
        return super().get_queryset(request).using(self.alias)  # type: ignore[misc]

    alias = "default"


class TaskInline(ReadOnly, admin.TabularInline):
    model = SessionTask
    fields = ("task_id", "name", "state", "worker", "dispatched_at", "started_at", "finished_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False


class RunInline(ReadOnly, admin.TabularInline):
    model = Run
    verbose_name_plural = "history"
    fields = ("task_id", "attempt", "name", "state", "worker", "started_at", "runtime", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False

    @admin.display(description="runtime")
    def runtime(self, run: Run) -> str:
        if run.finished_at is None or run.started_at is None:
            return "-"
        return f"{(run.finished_at - run.started_at).total_seconds() * 1000:.0f} ms"


class SessionAdmin(ReadOnly, admin.ModelAdmin):
    list_display = (
        "id",
        "state_badge",
        "hostname",
        "user_id",
        "agent_id",
        "turns",
        "created_at",
        "closed_at",
        "reason",
    )
    list_filter = ("status", "hostname", "user_id")
    search_fields = ("id", "user_id", "agent_id")
    list_per_page = 50
    show_full_result_count = False  # one COUNT less on a large store
    fields = (
        "id",
        "status",
        "reason",
        "hostname",
        "queue",
        "user_id",
        "agent_id",
        "metadata_json",
        "turns",
        "max_turns",
        "creation_timeout",
        "execution_timeout",
        "heartbeat_timeout",
        "created_at",
        "opened_at",
        "deadline_at",
        "closed_at",
    )
    readonly_fields = fields
    inlines = (TaskInline, RunInline)
    actions = ("complete_sessions", "fail_sessions")

    @admin.display(description="state", ordering="status")
    def state_badge(self, session: Session) -> Any:  # SafeString
        colors = {"open": "#2e7d32", "pending": "#f9a825", "closed": "#546e7a", "failed": "#c62828"}
        return format_html(
            '<span style="color:{};font-weight:bold">{}</span>',
            colors.get(session.status, "inherit"),
            session.status,
        )

    @admin.display(description="metadata")
    def metadata_json(self, session: Session) -> Any:  # SafeString
        shown = json.dumps(session.metadata, indent=2, default=str)
        return format_html("<pre>{}</pre>", shown)

    def has_end_permission(self, request: Any) -> bool:
        return bool(request.user.has_perm("sessionflow.end_session"))

    @admin.action(description="Complete the selected sessions", permissions=["end"])
    def complete_sessions(self, request: Any, queryset: Any) -> None:
        self._end(request, queryset, SessionStatus.CLOSED, Reason.COMPLETED.value)

    @admin.action(description="Fail the selected sessions", permissions=["end"])
    def fail_sessions(self, request: Any, queryset: Any) -> None:
        self._end(request, queryset, SessionStatus.FAILED, _FAIL_REASON)

    def _end(self, request: Any, queryset: Any, status: SessionStatus, reason: str) -> None:
        ids = list(queryset.values_list("id", flat=True))
        try:
            results = ops.end_sessions(get_flow(), ids, status, reason)
        except SessionFlowError as exc:
            self.message_user(request, f"Could not end sessions: {exc}", messages.ERROR)
            return
        outcomes: dict[str, list[str]] = {}
        for result in results:
            outcomes.setdefault(result["outcome"], []).append(result["session_id"])
        verb = "completed" if status is SessionStatus.CLOSED else "failed"
        if outcomes.get("ended"):
            self.message_user(request, f"{len(outcomes['ended'])} session(s) {verb}.")
        for outcome, label in (
            ("already_ended", "had already ended"),
            ("not_open", "are still waiting for a worker"),
            ("not_found", "are not in the store"),
        ):
            if outcomes.get(outcome):
                self.message_user(
                    request, f"{len(outcomes[outcome])} session(s) {label}.", messages.WARNING
                )


class WorkerAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ("nodename", "status", "heartbeat_age", "pid", "max_sessions", "host", "queue")
    list_filter = ("status",)
    fields = ("nodename", "status", "host", "pid", "queue", "max_sessions", "started_at")
    readonly_fields = fields

    @admin.display(description="last heartbeat", ordering="last_heartbeat_at")
    def heartbeat_age(self, worker: Worker) -> str:
        beat = worker.last_heartbeat_at
        if beat is None:
            return "-"
        now = timezone.now()
        if timezone.is_naive(beat) != timezone.is_naive(now):  # USE_TZ differs from the column
            now, beat = _utc(now), _utc(beat)
        return f"{max((now - beat).total_seconds(), 0):.1f} s ago"


def _utc(value: datetime) -> datetime:
    if timezone.is_naive(value):
        return value.replace(tzinfo=dt_timezone.utc)
    return value.astimezone(dt_timezone.utc)


def register(site: Any = admin.site) -> None:
    """Register the session and worker admins on ``site``, reading from the store's alias."""
    alias = store_alias()
    if alias is None:
        return
    for model, model_admin in ((Session, SessionAdmin), (Worker, WorkerAdmin)):
        if site.is_registered(model):
            continue
        inlines = tuple(_bound(inline, alias) for inline in model_admin.inlines)
        site.register(model, _bound(model_admin, alias, inlines=inlines))


def _bound(cls: type, alias: str, **attrs: Any) -> type:
    """``cls`` reading from the database ``alias``."""
    return type(cls.__name__, (cls,), {"alias": alias, "__module__": cls.__module__, **attrs})


register()

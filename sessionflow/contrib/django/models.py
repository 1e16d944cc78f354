"""Read-only views of the store's tables for the admin (unmanaged: Django never changes them).

Only the columns the admin shows are declared, so a store at a newer schema revision
(more columns) still reads. JSON columns are read with :class:`StoreJSONField`:
Django's ``JSONField`` over PostgreSQL's ``json`` type (what the store uses, not
``jsonb``) gets values the driver already decoded and crashes on them.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import models


class StoreJSONField(models.TextField):
    """A JSON column of the store, read as Python values on every database.

    PostgreSQL's driver hands ``json`` columns over decoded; SQLite hands over text.
    """

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode()
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            return value


class Session(models.Model):
    """A session (``sf_sessions``): pending, open, closed or failed."""

    id = models.CharField(primary_key=True, max_length=64)
    status = models.CharField("state", max_length=16)
    reason = models.CharField(max_length=64, null=True)
    hostname = models.CharField("worker", max_length=255, null=True)
    queue = models.CharField(max_length=300, null=True)
    user_id = models.CharField("user", max_length=255, null=True)
    agent_id = models.CharField("agent", max_length=255, null=True)
    metadata = StoreJSONField(null=True)
    turns = models.IntegerField()
    max_turns = models.IntegerField(null=True)
    creation_timeout = models.FloatField()
    execution_timeout = models.FloatField()
    heartbeat_timeout = models.FloatField()
    created_at = models.DateTimeField("created")
    opened_at = models.DateTimeField("opened", null=True)
    deadline_at = models.DateTimeField("deadline", null=True)
    closed_at = models.DateTimeField("closed", null=True)

    class Meta:
        managed = False
        db_table = "sf_sessions"
        ordering = ("-created_at",)
        default_permissions = ("view",)
        permissions = (("end_session", "Can complete or fail sessions"),)

    def __str__(self) -> str:
        return str(self.id)


class SessionTask(models.Model):
    """A task sent through a session (``sf_session_tasks``)."""

    task_id = models.CharField(primary_key=True, max_length=255)
    session = models.ForeignKey(
        Session,
        on_delete=models.DO_NOTHING,
        db_column="session_id",
        db_constraint=False,
        related_name="tasks",
    )
    name = models.CharField(max_length=255, null=True)
    state = models.CharField(max_length=16)
    worker = models.CharField(max_length=255, null=True)
    dispatched_at = models.DateTimeField("dispatched")
    started_at = models.DateTimeField("started", null=True)
    finished_at = models.DateTimeField("finished", null=True)

    class Meta:
        managed = False
        db_table = "sf_session_tasks"
        ordering = ("dispatched_at",)
        default_permissions = ("view",)
        verbose_name = "task"

    def __str__(self) -> str:
        return str(self.task_id)


class Run(models.Model):
    """One execution of a session task (``sf_runs``): the session's history."""

    id = models.IntegerField(primary_key=True)
    session = models.ForeignKey(
        Session,
        on_delete=models.DO_NOTHING,
        db_column="session_id",
        db_constraint=False,
        related_name="runs",
    )
    task_id = models.CharField(max_length=255)
    attempt = models.IntegerField()
    name = models.CharField(max_length=255, null=True)
    state = models.CharField(max_length=16)
    worker = models.CharField(max_length=255, null=True)
    started_at = models.DateTimeField("started")
    finished_at = models.DateTimeField("finished", null=True)
    error = models.TextField(null=True)

    class Meta:
        managed = False
        db_table = "sf_runs"
        ordering = ("started_at", "id")
        default_permissions = ("view",)
        verbose_name = "run"

    def __str__(self) -> str:
        return f"{self.task_id} #{self.attempt}"


class Worker(models.Model):
    """A worker process as the store knows it (``sf_workers``)."""

    nodename = models.CharField(primary_key=True, max_length=255)
    host = models.CharField(max_length=255, null=True)
    queue = models.CharField(max_length=300)
    pid = models.IntegerField()
    max_sessions = models.IntegerField("cap")
    status = models.CharField(max_length=16)
    started_at = models.DateTimeField("started")
    last_heartbeat_at = models.DateTimeField("last heartbeat")

    class Meta:
        managed = False
        db_table = "sf_workers"
        ordering = ("nodename",)
        default_permissions = ("view",)

    def __str__(self) -> str:
        return str(self.nodename)

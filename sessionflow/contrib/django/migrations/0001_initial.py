"""The store's tables for Django: unmanaged models for the admin, and the packaged Alembic
scripts run on the database that holds the store (see ``sessionflow.contrib.django.schema``).

Unapplying this migration leaves the store in place.
"""

from django.db import migrations, models

import sessionflow.contrib.django.models
from sessionflow.contrib.django.schema import run_python_upgrade


class Migration(migrations.Migration):
    initial = True
    atomic = False  # the Alembic scripts run in a transaction of their own

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Run",
            fields=[
                ("id", models.IntegerField(primary_key=True, serialize=False)),
                ("task_id", models.CharField(max_length=255)),
                ("attempt", models.IntegerField()),
                ("name", models.CharField(max_length=255, null=True)),
                ("state", models.CharField(max_length=16)),
                ("worker", models.CharField(max_length=255, null=True)),
                ("started_at", models.DateTimeField(verbose_name="started")),
                ("finished_at", models.DateTimeField(null=True, verbose_name="finished")),
                ("error", models.TextField(null=True)),
            ],
            options={
                "verbose_name": "run",
                "db_table": "sf_runs",
                "ordering": ("started_at", "id"),
                "managed": False,
                "default_permissions": ("view",),
            },
        ),
        migrations.CreateModel(
            name="Session",
            fields=[
                ("id", models.CharField(max_length=64, primary_key=True, serialize=False)),
                ("status", models.CharField(max_length=16, verbose_name="state")),
                ("reason", models.CharField(max_length=64, null=True)),
                ("hostname", models.CharField(max_length=255, null=True, verbose_name="worker")),
                ("queue", models.CharField(max_length=300, null=True)),
                ("user_id", models.CharField(max_length=255, null=True, verbose_name="user")),
                ("agent_id", models.CharField(max_length=255, null=True, verbose_name="agent")),
                ("metadata", sessionflow.contrib.django.models.StoreJSONField(null=True)),
                ("turns", models.IntegerField()),
                ("max_turns", models.IntegerField(null=True)),
                ("creation_timeout", models.FloatField()),
                ("execution_timeout", models.FloatField()),
                ("heartbeat_timeout", models.FloatField()),
                ("created_at", models.DateTimeField(verbose_name="created")),
                ("opened_at", models.DateTimeField(null=True, verbose_name="opened")),
                ("deadline_at", models.DateTimeField(null=True, verbose_name="deadline")),
                ("closed_at", models.DateTimeField(null=True, verbose_name="closed")),
            ],
            options={
                "db_table": "sf_sessions",
                "ordering": ("-created_at",),
                "permissions": (("end_session", "Can complete or fail sessions"),),
                "managed": False,
                "default_permissions": ("view",),
            },
        ),
        migrations.CreateModel(
            name="SessionTask",
            fields=[
                ("task_id", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=255, null=True)),
                ("state", models.CharField(max_length=16)),
                ("worker", models.CharField(max_length=255, null=True)),
                ("dispatched_at", models.DateTimeField(verbose_name="dispatched")),
                ("started_at", models.DateTimeField(null=True, verbose_name="started")),
                ("finished_at", models.DateTimeField(null=True, verbose_name="finished")),
            ],
            options={
                "verbose_name": "task",
                "db_table": "sf_session_tasks",
                "ordering": ("dispatched_at",),
                "managed": False,
                "default_permissions": ("view",),
            },
        ),
        migrations.CreateModel(
            name="Worker",
            fields=[
                ("nodename", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("host", models.CharField(max_length=255, null=True)),
                ("queue", models.CharField(max_length=300)),
                ("pid", models.IntegerField()),
                ("max_sessions", models.IntegerField(verbose_name="cap")),
                ("status", models.CharField(max_length=16)),
                ("started_at", models.DateTimeField(verbose_name="started")),
                ("last_heartbeat_at", models.DateTimeField(verbose_name="last heartbeat")),
            ],
            options={
                "db_table": "sf_workers",
                "ordering": ("nodename",),
                "managed": False,
                "default_permissions": ("view",),
            },
        ),
        migrations.RunPython(run_python_upgrade, migrations.RunPython.noop, elidable=False),
    ]

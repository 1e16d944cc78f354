"""The project's Celery app, as in Celery's Django guide, plus one line for sessionflow.

Workers: ``celery -A djsite worker -n w1@%h --max-sessions 4``.
"""

from __future__ import annotations

import os

from celery import Celery

from sessionflow.contrib.django import setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")

app = Celery("djsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
flow = setup(app)  # reads settings.SESSIONFLOW: the store lives in DATABASES["default"]

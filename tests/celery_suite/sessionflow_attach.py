"""pytest plugin: attach ``SessionFlow(app)`` to every app Celery's integration suite creates.

Loaded with ``-p sessionflow_attach`` in the runner's attached mode only. Celery's
fixtures (``celery_app``, ``celery_session_app``) build their apps through
``celery.contrib.testing.app.TestApp``, imported when each app is made, so
replacing that one function reaches every app of the suite, the embedded worker's
included. At the end it writes what it attached to ``$SF_SUITE_REPORT`` (JSON), so
the runner can tell an attached run from one where the hook silently missed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing import app as testing_app

from sessionflow import SessionFlow

DATABASE_URL_ENV = "SF_SUITE_DATABASE_URL"
REPORT_ENV = "SF_SUITE_REPORT"

_original_test_app = testing_app.TestApp
_attached: list[Celery] = []


def _attached_test_app(*args: Any, **kwargs: Any) -> Celery:
    app: Celery = _original_test_app(*args, **kwargs)
    app.conf.sessionflow_database_url = os.environ[DATABASE_URL_ENV]
    SessionFlow(app)
    _attached.append(app)
    return app


def pytest_configure(config: pytest.Config) -> None:
    testing_app.TestApp = _attached_test_app


def pytest_unconfigure(config: pytest.Config) -> None:
    testing_app.TestApp = _original_test_app
    workers, wrapped = [], 0
    for app in _attached:
        flow = SessionFlow.of(app)
        if flow is not None and flow.worker_nodename is not None:
            workers.append(flow.worker_nodename)
        wrapped += sum(
            type(t.__dict__.get("__trace__")).__module__.startswith("sessionflow.")
            for t in app.tasks.values()
        )
    report = {"apps": len(_attached), "workers": workers, "wrapped_tasks": wrapped}
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(report))

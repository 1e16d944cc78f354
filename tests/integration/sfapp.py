"""The Celery app that integration tests and their worker processes share.

Workers import it as ``celery -A sfapp``; settings come from environment
variables that the harness sets (``SF_BROKER_URL`` …).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery

from sessionflow import SessionFlow, current_session


def create_app(env: Mapping[str, str]) -> Celery:
    app = Celery("sfapp", set_as_current=False)
    app.conf.update(
        broker_url=env["SF_BROKER_URL"],
        result_backend=env["SF_RESULT_BACKEND"],
        broker_transport_options=_transport_options(env),
        broker_connection_retry_on_startup=True,
        task_acks_late=False,
        worker_prefetch_multiplier=4,
        result_expires=None,
        sessionflow_database_url=env["SF_DATABASE_URL"],
        sessionflow_queue_prefix=env.get("SF_QUEUE_PREFIX", "sessionflow"),
        sessionflow_auto_migrate=True,
    )
    if env.get("SF_SECRET_KEY"):
        app.conf.sessionflow_secret_key = env["SF_SECRET_KEY"]
    data_dir = Path(env.get("SF_DATA_DIR", "."))
    _define_tasks(app, data_dir)
    SessionFlow(app)
    return app


def _transport_options(env: Mapping[str, str]) -> dict[str, Any]:
    folder = env.get("SF_BROKER_FOLDER")
    if not folder:
        return {}
    return {
        "data_folder_in": folder,
        "data_folder_out": folder,
        "control_folder": folder + "-control",
        "store_processed": False,
        "polling_interval": 0.05,
    }


def _define_tasks(app: Celery, data_dir: Path) -> None:
    @app.task(name="sfapp.where", shared=False, bind=True)
    def where(self: Any, *args: Any) -> dict[str, Any]:
        session = current_session()
        return {
            "args": list(args),
            "hostname": self.request.hostname,
            "pid": os.getpid(),
            "session": session.id if session else None,
        }

    @app.task(name="sfapp.collect", shared=False)
    def collect(results: list[Any]) -> list[Any]:
        return results

    @app.task(name="sfapp.sleep", shared=False)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @app.task(name="sfapp.touch", shared=False, bind=True)
    def touch(self: Any, name: str) -> str:
        (data_dir / name).write_text(self.request.hostname or "")
        return name

    @app.task(name="sfapp.spawn", shared=False)
    def spawn(arg: Any) -> str:
        session = current_session()
        assert session is not None, "spawn must run in a session"
        return str(session.apply_async(where, args=(arg,)).id)

    @app.task(name="sfapp.nested_create", shared=False)
    def nested_create() -> str:
        flow = SessionFlow(app)
        try:
            flow.create_session(creation_timeout=1, execution_timeout=10)
        except Exception as exc:
            return type(exc).__name__
        return "created"

    @app.task(name="sfapp.fail", shared=False, bind=True, max_retries=2)
    def fail(self: Any, retries_before_success: int = -1) -> int:
        if 0 <= self.request.retries < retries_before_success:
            raise self.retry(countdown=0.05)
        if retries_before_success < 0:
            raise ValueError("boom")
        return int(self.request.retries)


if "SF_BROKER_URL" in os.environ:
    app = create_app(os.environ)

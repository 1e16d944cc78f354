"""The Celery app of the placement example: a GPU worker and a CPU worker, one module.

Which worker offers what is decided when the worker starts, not here::

    celery -A placeapp worker -n gpu@%h --session-resources gpu=1 \\
        --session-labels zone=eu,vram_gb=24 --session-task-limits placeapp.render=1
    celery -A placeapp worker -n cpu@%h --session-resources cpu=4 --session-labels zone=us

Settings come from environment variables; without any, everything is embedded (no
servers): the filesystem broker (``sessionflow.fsbroker``), a ``file://`` result
backend (``fsbroker.result_backend``) and a SQLite session store, all under
``$PLACEMENT_DATA`` (default ``./data``).

- ``PLACEMENT_DATA``: folder for the embedded broker, results and store
- ``PLACEMENT_BROKER_URL``: e.g. ``redis://127.0.0.1:6379/0`` instead of the filesystem
- ``PLACEMENT_RESULT_BACKEND``: e.g. ``redis://127.0.0.1:6379/1`` instead of ``file://``
- ``PLACEMENT_DATABASE_URL``: e.g. ``postgresql+psycopg://127.0.0.1/test`` instead of
  SQLite (run ``sessionflow db upgrade --url URL`` once first)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

from sessionflow import SessionFlow, current_session, fsbroker

DATA = Path(os.environ.get("PLACEMENT_DATA") or Path(__file__).resolve().parent / "data")

app = Celery("placeapp")
if os.environ.get("PLACEMENT_BROKER_URL"):
    app.conf.broker_url = os.environ["PLACEMENT_BROKER_URL"]
else:
    app.conf.update(fsbroker.settings(DATA))  # no server: messages are files under DATA
if not os.environ.get("PLACEMENT_RESULT_BACKEND"):
    (DATA / "results").mkdir(parents=True, exist_ok=True)
app.conf.update(
    result_backend=(
        os.environ.get("PLACEMENT_RESULT_BACKEND") or fsbroker.result_backend(DATA / "results")
    ),
    broker_connection_retry_on_startup=True,
    sessionflow_database_url=(
        os.environ.get("PLACEMENT_DATABASE_URL") or f"sqlite:///{DATA / 'sessionflow.db'}"
    ),
    sessionflow_queue_prefix="placeapp",
)
flow = SessionFlow(app)  # adds --session-resources, --session-labels, --session-task-limits


def _ran(task: Any, **facts: Any) -> dict[str, Any]:
    session = current_session()
    return {
        "worker": task.request.hostname,
        "session": session.id if session else None,
        **facts,
    }


@app.task(bind=True)
def render(self: Any, frames: int) -> dict[str, Any]:
    """A job for a GPU: at most one runs at once on the GPU worker (its task limit)."""
    started = time.time()
    time.sleep(0.05 * frames)
    return _ran(self, frames=frames, started=started, finished=time.time())


@app.task(bind=True)
def scrape(self: Any, pages: int) -> dict[str, Any]:
    """A job for CPU cores."""
    time.sleep(0.01 * pages)
    return _ran(self, pages=pages)

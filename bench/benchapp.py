"""The Celery app that a benchmark and its ``celery worker`` processes share.

Workers import it as ``celery -A benchapp`` with ``bench/`` on ``PYTHONPATH``;
settings come from the ``SFB_*`` environment variables that
:class:`_common.Stack` sets, so the client and its workers always agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery

from sessionflow import SessionFlow

NOOP = "bench.noop"


def create_app(env: Mapping[str, str]) -> Celery:
    """A Celery app on the benchmark's broker, result backend and session store."""
    prefix = env["SFB_QUEUE_PREFIX"]
    keyprefix = env["SFB_KEYPREFIX"]
    app = Celery("benchapp", set_as_current=False)
    app.conf.update(
        broker_url=env["SFB_BROKER_URL"],
        result_backend=env["SFB_RESULT_BACKEND"],
        # Every Redis key of a run starts with its own prefix: runs never meet each
        # other (or the tests' databases), and cleanup deletes exactly this run's keys.
        broker_transport_options={"global_keyprefix": keyprefix},
        result_backend_transport_options={"global_keyprefix": keyprefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=f"{prefix}.plain",
        result_expires=3600,
        sessionflow_database_url=env["SFB_DATABASE_URL"],
        sessionflow_queue_prefix=prefix,
        sessionflow_auto_migrate=True,
    )
    _define_tasks(app)
    SessionFlow(app)
    return app


def _define_tasks(app: Celery) -> None:
    @app.task(name=NOOP, shared=False)  # type: ignore[untyped-decorator]
    def noop(*args: Any) -> None:
        """The trivial task whose throughput and round trip are measured."""


if "SFB_BROKER_URL" in os.environ:
    app = create_app(os.environ)

"""The Celery app that a benchmark and its ``celery worker`` processes share.

Workers import it as ``celery -A benchapp`` with ``bench/`` on ``PYTHONPATH``;
settings come from the ``SFB_*`` environment variables that
:class:`_common.Stack` sets, so the client and its workers always agree.

With ``SFB_COUNT_DIR`` set (only ever in a worker's environment), the worker counts
the store statements of its main process and of every pool process and publishes
them to that directory (see ``_sqlcount``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import _sqlcount
from celery import Celery

from sessionflow import SessionFlow

NOOP = "bench.noop"
_COUNTING = bool(os.environ.get("SFB_COUNT_DIR"))  # only ever set in a worker


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
        if _COUNTING:  # the exact moment the body starts, inside any wrapper of task.run
            _sqlcount.body_reached()


def _count_statements(directory: str) -> None:
    """Count store statements in this worker: main process now, pool processes from fork."""
    from celery import signals

    _sqlcount.install("main", directory)  # a fork resets the counters and role "pool"

    def on_process_init(**_: Any) -> None:
        _sqlcount.set_role("pool")
        _sqlcount.wrap_trace_functions()

    signals.worker_process_init.connect(on_process_init, weak=False)
    # Connected before any tracer is built: build_tracer captures the receiver lists.
    signals.task_prerun.connect(_sqlcount.on_task_prerun, weak=False)
    signals.task_postrun.connect(_sqlcount.on_task_postrun, weak=False)


if _COUNTING:
    _count_statements(os.environ["SFB_COUNT_DIR"])

if "SFB_BROKER_URL" in os.environ:
    app = create_app(os.environ)

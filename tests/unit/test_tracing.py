"""celery_ext/tracing.py: wrapping tasks changes nothing a plain task relies on."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from celery import Celery

from sessionflow import SessionFlow
from sessionflow.celery_ext.tracing import wrap_tracers


def test_wrapped_run_keeps_its_signature(tmp_path: Path) -> None:
    """Task.retry reads inspect.signature(task.run) to merge args and kwargs (Celery #6494)."""
    app = Celery("tracing", broker="memory://", set_as_current=False)
    app.conf.sessionflow_database_url = f"sqlite:///{tmp_path / 't.db'}"

    @app.task(bind=True, name="tracing.bound", shared=False)
    def bound(self: Any, foo: int, bar: str = "x") -> int:
        return foo

    @app.task(name="tracing.plain", shared=False)
    def plain(foo: int, *, baz: float = 1.0) -> int:
        return foo

    flow = SessionFlow(app)
    before = {
        name: inspect.signature(app.tasks[name].run) for name in ("tracing.bound", "tracing.plain")
    }
    wrap_tracers(flow, "w@host")
    after = {name: inspect.signature(app.tasks[name].run) for name in before}
    assert after == before
    assert list(after["tracing.bound"].parameters) == ["foo", "bar"]
    assert app.tasks["tracing.plain"].run(3) == 3
    assert app.tasks["tracing.plain"].run.__name__ == "plain"
    app.close()

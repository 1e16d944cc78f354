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

from celery import Celery, chain

from sessionflow import SessionFlow, current_session, detached, fsbroker


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
    if env.get("SF_BROKER_FOLDER"):  # the embedded stack: atomic message files
        app.conf.update(broker_url="filesystem://localhost/", broker_transport=fsbroker.Transport)
    if env.get("SF_FLUSH_INTERVAL"):
        app.conf.sessionflow_flush_interval = float(env["SF_FLUSH_INTERVAL"])
    if env.get("SF_SECRET_KEY"):
        app.conf.sessionflow_secret_key = env["SF_SECRET_KEY"]
    data_dir = Path(env.get("SF_DATA_DIR", "."))
    _define_tasks(app, data_dir)
    _define_state_tasks(app)
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

    @app.task(name="sfapp.render", shared=False, bind=True)
    def render(self: Any, seconds: float) -> dict[str, Any]:
        """A task a worker may limit (--session-task-limits): when it ran, and where."""
        started = time.time()
        time.sleep(seconds)
        return {"hostname": self.request.hostname, "started": started, "finished": time.time()}

    @app.task(name="sfapp.touch", shared=False, bind=True)
    def touch(self: Any, name: str) -> str:
        (data_dir / name).write_text(self.request.hostname or "")
        return name

    @app.task(name="sfapp.spawn", shared=False)
    def spawn(arg: Any) -> str:
        session = current_session()
        assert session is not None, "spawn must run in a session"
        return str(session.apply_async(where, args=(arg,)).id)

    @app.task(name="sfapp.opened", shared=False)
    def opened(session_id: str) -> str:
        """An on_open callback: leaves a file named after the session it was sent for."""
        (data_dir / f"opened-{session_id}").write_text(session_id)
        return session_id

    @app.task(name="sfapp.spawn_plain", shared=False)
    def spawn_plain(arg: Any, how: str = "delay") -> list[str]:
        """Send child tasks the plain Celery way from inside a session task."""
        if how == "delay":
            return [where.delay(arg).id]
        if how == "send_task":
            return [app.send_task("sfapp.where", args=(arg,)).id]
        if how == "chain":
            result = chain(where.s(arg), where.s()).delay()
            return [result.parent.id, result.id]
        if how == "detached":
            with detached():
                return [where.delay(arg).id]
        raise ValueError(how)

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


def await_start(st: Any, tag: str, timeout: float = 60) -> None:
    """Count in at ``app:ready-TAG`` and wait until someone sets ``app:go-TAG``."""
    st.increment(f"app:ready-{tag}")
    deadline = time.monotonic() + timeout
    while not st.get(f"app:go-{tag}"):
        if time.monotonic() > deadline:
            raise TimeoutError("nobody said go")
        time.sleep(0.005)


def _define_state_tasks(app: Celery) -> None:
    """Tasks of the session-state tests (tests/integration/test_state.py)."""
    from sessionflow import StateConflict

    SessionFlow(app).register_reducer("longest", lambda cur, new: max(cur or "", new, key=len))

    def state() -> Any:
        session = current_session()
        assert session is not None, "state tasks must run in a session"
        return session.state

    @app.task(name="sfapp.state_set", shared=False)
    def state_set(key: str, value: Any) -> Any:
        state()[key] = value
        return value

    @app.task(name="sfapp.state_get", shared=False)
    def state_get(key: str) -> Any:
        return state().get(key)

    @app.task(name="sfapp.state_dump", shared=False)
    def state_dump(*_: Any) -> dict[str, Any]:
        return dict(state().to_dict())

    @app.task(name="sfapp.state_incr", shared=False)
    def state_incr(key: str, times: int, start_together: str | None = None) -> int:
        st = state()
        if start_together:
            await_start(st, start_together)
        for _ in range(times):
            st.increment(key)
        return times

    @app.task(name="sfapp.state_rmw", shared=False)
    def state_rmw(key: str, times: int) -> int:
        """Add 1 ``times`` times through get/set, retrying on conflicts; returns conflicts."""
        conflicts = 0
        for _ in range(times):
            while True:
                try:
                    state().set(key, state().get(key, 0) + 1)
                    break
                except StateConflict:
                    conflicts += 1
        return conflicts

    @app.task(name="sfapp.state_branch", shared=False)
    def state_branch(index: int, increments: int) -> dict[str, Any]:
        st = state()
        seen = st.get("seen_at_dispatch")
        for _ in range(increments):
            st.increment("hits")
        st.append("order", index)
        st[f"member{index}"] = index
        st["winner"] = index
        if index == 0:
            st.delete("doomed")
        return {"seen": seen, "hits_in_branch": st.get("hits")}

    @app.task(name="sfapp.state_fail_branch", shared=False)
    def state_fail_branch(index: int) -> None:
        state()[f"failed{index}"] = True
        raise RuntimeError(f"branch {index} failed")

    @app.task(name="sfapp.state_write", shared=False)
    def state_write(mapping: dict[str, Any]) -> None:
        state().update(mapping)


if "SF_BROKER_URL" in os.environ:
    app = create_app(os.environ)

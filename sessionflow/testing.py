"""pytest fixtures that run your app's sessions on a real worker.

Sessions need a worker: Celery's eager mode (``task_always_eager``) runs tasks in the
test process, and sessionflow refuses it. This plugin (registered under ``pytest11``;
it does nothing unless a test uses its fixtures) starts real ``celery worker``
subprocesses for your app instead:

- ``sessionflow_worker``: a running worker (started once per test session, started
  again for the next test if a test killed it); ``.kill()``, ``.stop()``,
  ``.restart()``, ``.start()``, ``.log()``, ``.nodename``;
- ``sessionflow_cluster``: where the workers run; ``start_worker(name, ...)`` for more;
- ``sessionflow_flow``: the :class:`SessionFlow` of your app in the test process;
- ``sessionflow_app``: your Celery app, configured like the workers.

Name the app in your pytest settings (``sessionflow_app = "proj.celery:app"``) or
override the ``sessionflow_app_path`` fixture. By default the workers and the test
process share an embedded broker (``sessionflow.fsbroker``) with a ``file://`` result
backend and a temporary SQLite store, all in a temporary folder: no server needed.
``sessionflow_broker = app`` keeps your app's broker and result backend;
``sessionflow_store`` is ``auto`` (default), ``temporary``, ``django`` or ``app``.

With pytest-django the workers use the test databases (the plugin requests
``django_db_setup``), and ``auto`` keeps a store configured as
``SESSIONFLOW = {"DATABASE": alias}`` in the test database of that alias. Tests whose
work is done by a worker must commit what it reads: use ``transactional_db``
(``@pytest.mark.django_db(transaction=True)``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from .testworkers import (
    ENV_APP,
    ENV_CONF,
    ENV_DATABASES,
    ENV_DJANGO_STORE,
    Cluster,
    Worker,
)

BROKERS = ("embedded", "app")
STORES = ("auto", "temporary", "django", "app")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("sessionflow_app", "Celery app the sessionflow fixtures run: proj.celery:app")
    parser.addini("sessionflow_broker", "embedded (default) or app", default="embedded")
    parser.addini("sessionflow_store", "auto (default), temporary, django or app", default="auto")


# -- the worker process's side ----------------------------------------------------------


def load_app(path: str) -> Any:
    """The Celery app ``path`` names (``module:attr`` or a module), as ``celery -A`` finds it."""
    from celery import Celery
    from celery.app.utils import find_app
    from celery.utils.imports import import_from_cwd, symbol_by_name

    app = find_app(path, symbol_by_name=symbol_by_name, imp=import_from_cwd)
    if not isinstance(app, Celery):
        raise pytest.UsageError(f"sessionflow_app = {path!r} is not a Celery app")
    return app


def _worker_app() -> Any:
    """``celery -A sessionflow.testing:worker_app``: the user's app, set up as the test's."""
    databases = json.loads(os.environ.get(ENV_DATABASES) or "{}")
    if databases:  # the test databases pytest-django made, before the app reads settings
        from django.conf import settings

        for alias, name in databases.items():
            settings.DATABASES[alias]["NAME"] = name
    app = load_app(os.environ[ENV_APP])
    if os.environ.get(ENV_DJANGO_STORE):
        # Reading the settings above may have imported the app (a project's __init__
        # imports its Celery app), so it saw the names before they were changed.
        from .contrib.django import setup

        setup(app)
    configure(app, json.loads(os.environ.get(ENV_CONF) or "{}"))
    return app


def __getattr__(name: str) -> Any:
    if name == "worker_app":
        return _worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def configure(app: Any, conf: dict[str, Any]) -> None:
    """Apply test settings to ``app`` (broker, backend, store), in either process."""
    from celery.utils.imports import symbol_by_name

    conf = dict(conf)
    if isinstance(conf.get("broker_transport"), str):
        conf["broker_transport"] = symbol_by_name(conf["broker_transport"])
    app.conf.update(conf)
    pool = getattr(app, "_pool", None)
    if pool is not None:  # connections made under the old broker settings
        pool.force_close_all()
        app._pool = None
        if "amqp" in app.__dict__:
            app.amqp._producer_pool = None
    local = getattr(app, "_local", None)
    if local is not None:  # this thread's result backend, made from the old settings
        local.__dict__.pop("backend", None)
    from .flow import SessionFlow

    flow = SessionFlow.of(app)
    if flow is not None:
        reset_flow(flow)


def reset_flow(flow: Any) -> None:
    """Make ``flow`` read its settings again (they were read before the test changed them).

    NEEDS-CORE: a public ``SessionFlow.reset()`` would replace this.
    """
    if not any(name in flow.__dict__ for name in _cached_names(type(flow))):
        return
    flow.close()
    for name in _cached_names(type(flow)):
        flow.__dict__.pop(name, None)


def _cached_names(cls: type) -> list[str]:
    return [
        name
        for klass in cls.__mro__
        for name, value in vars(klass).items()
        if isinstance(value, cached_property)
    ]


def cluster_settings(
    folder: Path, broker: str, store: str, django_store: bool
) -> tuple[dict[str, Any], str]:
    """The Celery settings of a test cluster, and the store mode in force."""
    from . import fsbroker

    if broker not in BROKERS:
        raise pytest.UsageError(f"sessionflow_broker = {broker!r}: use one of {BROKERS}")
    if store not in STORES:
        raise pytest.UsageError(f"sessionflow_store = {store!r}: use one of {STORES}")
    conf: dict[str, Any] = {"sessionflow_queue_prefix": f"sftest-{uuid.uuid4().hex[:8]}"}
    if broker == "embedded":
        settings = fsbroker.settings(folder / "broker")
        settings["broker_transport"] = "sessionflow.fsbroker:Transport"
        results = folder / "results"
        results.mkdir(parents=True, exist_ok=True)
        conf.update(settings, result_backend=fsbroker.result_backend(results))
    if store == "auto":
        store = "django" if django_store else "temporary"
    if store == "temporary":
        conf["sessionflow_database_url"] = f"sqlite:///{folder / 'sessionflow.db'}"
        conf["sessionflow_auto_migrate"] = True
    return conf, store


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sessionflow_app_path(pytestconfig: pytest.Config) -> str:
    """Import path of the Celery app the workers run (``proj.celery:app``)."""
    path = pytestconfig.getini("sessionflow_app")
    if not path:
        raise pytest.UsageError(
            "sessionflow fixtures need your Celery app: set sessionflow_app = "
            '"proj.celery:app" in your pytest settings, or override the '
            "sessionflow_app_path fixture"
        )
    return str(path)


@pytest.fixture(scope="session")
def sessionflow_options(pytestconfig: pytest.Config) -> dict[str, Any]:
    """Where the workers' broker and store are: override to change (``conf``: more
    Celery settings for both sides)."""
    return {
        "broker": pytestconfig.getini("sessionflow_broker") or "embedded",
        "store": pytestconfig.getini("sessionflow_store") or "auto",
        "conf": {},
    }


@pytest.fixture(scope="session")
def sessionflow_cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sessionflow_app_path: str,
    sessionflow_options: dict[str, Any],
) -> Iterator[Cluster]:
    """The broker, store and workers of this test session (workers stop at its end)."""
    databases, django_store = _django_databases(request)
    folder = tmp_path_factory.mktemp("sessionflow")
    conf, store = cluster_settings(
        folder, sessionflow_options["broker"], sessionflow_options["store"], django_store
    )
    conf.update(sessionflow_options.get("conf") or {})
    app = load_app(sessionflow_app_path)
    if store == "django":
        from .contrib.django import setup

        setup(app)  # the store's URL from the test database's settings
    configure(app, conf)
    cluster = Cluster(
        sessionflow_app_path,
        folder,
        conf,
        databases,
        django_store=store == "django",
        cwd=Path(str(request.config.rootpath)),
    )
    try:
        yield cluster
    finally:
        cluster.stop()
        from .flow import SessionFlow

        flow = SessionFlow.of(app)
        if flow is not None:
            flow.close()  # no connection may outlive the test database


@pytest.fixture
def sessionflow_worker(sessionflow_cluster: Cluster) -> Worker:
    """A running worker ``w1`` (``--max-sessions 4 -c 2``), revived if a test killed it."""
    worker = sessionflow_cluster.workers.get("w1")
    if worker is not None and worker.alive():
        return worker
    return sessionflow_cluster.start_worker("w1")


@pytest.fixture(scope="session")
def sessionflow_app(sessionflow_cluster: Cluster, sessionflow_app_path: str) -> Any:
    """Your Celery app in the test process, configured like the workers."""
    return load_app(sessionflow_app_path)


@pytest.fixture(scope="session")
def sessionflow_flow(sessionflow_app: Any) -> Any:
    """The :class:`~sessionflow.SessionFlow` of your app in the test process."""
    from .flow import SessionFlow

    return SessionFlow(sessionflow_app)


def _django_databases(request: pytest.FixtureRequest) -> tuple[dict[str, str], bool]:
    """With pytest-django: the test databases (made now) and whether the store is in one."""
    if not request.config.pluginmanager.hasplugin("django"):
        return {}, False
    from django.conf import settings

    if not settings.configured:
        return {}, False
    request.getfixturevalue("django_db_setup")
    from django.db import connections

    names: dict[str, str] = {}
    for alias in connections:
        name = str(connections[alias].settings_dict.get("NAME") or "")
        if "mode=memory" in name or name == ":memory:":
            raise pytest.UsageError(
                f"DATABASES[{alias!r}] has an in-memory SQLite test database, which a worker "
                f"process cannot see: set DATABASES[{alias!r}]['TEST'] = {{'NAME': "
                "'/some/path/test.sqlite3'}"
            )
        names[alias] = name
    sessionflow = getattr(settings, "SESSIONFLOW", None) or {}
    return names, isinstance(sessionflow, dict) and sessionflow.get("DATABASE") is not None


__all__ = ["Cluster", "Worker", "configure", "load_app", "reset_flow"]

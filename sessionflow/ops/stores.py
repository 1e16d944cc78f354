"""Which store the operator's commands act on, its schema, and retention."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.engine import URL, make_url

from .. import limits
from ..config import DEFAULT_DATABASE_URL, Config, check_database_url, load_config
from ..errors import ConfigurationError, InvalidArgument
from ..records import utcnow
from ..retention import BATCH
from ..retention import prune as retention_prune
from ..store.sql import SQLStore
from .values import iso

if TYPE_CHECKING:
    from ..flow import SessionFlow


class StoreNotConfigured(ConfigurationError):
    """No session store was named, and using the default would create one."""


# -- which store -----------------------------------------------------------------------


def configured_url(app: Celery) -> str | None:
    """``sessionflow_database_url`` if the app sets it (a string or a ``sqlalchemy.URL``,
    as ``load_config`` takes it)."""
    url = app.conf.get("sessionflow_database_url")
    if isinstance(url, URL):
        return url.render_as_string(hide_password=False)
    return url if isinstance(url, str) and url else None


def default_store_hint() -> str:
    here = os.path.abspath(DEFAULT_DATABASE_URL.removeprefix("sqlite:///"))
    return f"the default store {DEFAULT_DATABASE_URL} (here {here})"


def store_config(app: Celery | None, url: str | None = None) -> Config:
    """The settings naming the store to act on: ``url``, else the app's configured one.

    Raises :class:`StoreNotConfigured` when neither names a store: the default
    (a SQLite file in the working directory) is never created implicitly.
    """
    if url:
        check_database_url(url)
        if app is None:
            return Config(database_url=url)
        return _with_url(load_config(app.conf, getattr(app, "namespace", None)), url)
    if app is None or configured_url(app) is None:
        which = (
            "No app was given" if app is None else f"The app {app.main or 'default'!r} sets none"
        )
        raise StoreNotConfigured(
            "which session store? Pass --url URL, or -A with an app that sets "
            f"sessionflow_database_url. {which}, and {default_store_hint()} is never "
            "created implicitly."
        )
    return load_config(app.conf, getattr(app, "namespace", None))


def _with_url(config: Config, url: str) -> Config:
    from dataclasses import replace

    return replace(config, database_url=url)


def existing_store(config: Config) -> None:
    """Refuse a SQLite file that does not exist (reading must not create one)."""
    url = make_url(config.database_url)
    if url.get_backend_name() != "sqlite":
        return
    path = url.database or ""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    if not os.path.exists(path):
        raise ConfigurationError(
            f"no session store at {config.masked_url}: {os.path.abspath(path)} does not exist "
            "(is this the working directory the workers use?)"
        )


# -- db ----------------------------------------------------------------------------------


def db_current(config: Config) -> dict[str, Any]:
    """The schema revision in force (changes nothing; a missing SQLite file is refused)."""
    existing_store(config)
    store = SQLStore(config)
    try:
        return {"url": config.masked_url, "revision": store.revision()}
    finally:
        store.dispose()


def db_upgrade(config: Config) -> dict[str, Any]:
    """Apply pending migrations; returns the revision now in force."""
    store = SQLStore(config)
    try:
        return {"url": config.masked_url, "revision": store.upgrade()}
    finally:
        store.dispose()


# -- retention -----------------------------------------------------------------------------


def prune(
    flow: SessionFlow, *, older_than: float | None = None, apply: bool = False
) -> dict[str, Any]:
    """What retention deletes: sessions ended more than ``older_than`` s ago (default:
    ``sessionflow_retention``), with their tasks, runs and state. ``apply`` deletes."""
    if older_than is None:
        older_than = flow.config.retention
        if older_than is None:
            raise InvalidArgument(
                "sessionflow_retention is None (ended sessions are kept for ever); "
                "pass --older-than to choose what to prune"
            )
    older_than = limits.seconds("older_than", older_than, zero=True)
    assert older_than is not None
    cutoff = utcnow() - timedelta(seconds=older_than)
    if apply:
        counts = retention_prune(flow.store, older_than, flow.config.history_max_runs)
    else:
        counts = flow.store.prune(cutoff, batch=BATCH, dry_run=True)
    return {
        "deleted": apply,
        "older_than": older_than,
        "ended_before": iso(cutoff),
        "sessions": counts.sessions,
        "tasks": counts.tasks,
        "runs": counts.runs,
        "state_keys": counts.state_keys,
    }

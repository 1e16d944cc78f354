"""Django system checks: the ``SESSIONFLOW`` settings, and a store behind its schema.

``sessionflow.E001``  ``SESSIONFLOW`` is not a dict, or has an unknown key
``sessionflow.E002``  the store is named twice, or ``DATABASE`` names no usable entry
                      (missing, MySQL/MariaDB, in-memory SQLite, another database)
``sessionflow.E003``  no Celery app found
``sessionflow.E004``  a sessionflow setting is invalid (from ``SESSIONFLOW`` or the
                      Celery namespace)
``sessionflow.W001``  the store is not at the schema revision this sessionflow needs
                      (a database check: ``manage.py check --database default``, and
                      ``migrate``)
"""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Tags, Warning, register

from ... import ops
from ...errors import ConfigurationError, SessionFlowError
from ...store.sql import migrate
from .conf import (
    SETTING,
    celery_app,
    check_values,
    database_url,
    key_label,
    store_config,
    unknown_keys,
    user_settings,
)
from .schema import store_alias_for


@register("sessionflow")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The ``SESSIONFLOW`` dict and the settings the Celery app will read."""
    try:
        values = user_settings()
    except ConfigurationError as exc:
        return [Error(str(exc), id="sessionflow.E001")]
    problems: list[Any] = [
        Error(
            f"unknown setting {key_label(key)}",
            hint=hint[0].upper() + hint[1:],
            obj=SETTING,
            id="sessionflow.E001",
        )
        for key, hint in unknown_keys(values)
    ]
    if problems:
        return problems
    try:
        check_values(values)
        if values.get("DATABASE") is not None:
            database_url(values["DATABASE"])
    except ConfigurationError as exc:
        return [Error(str(exc), obj=SETTING, id="sessionflow.E002")]
    try:
        celery_app(values)
    except ConfigurationError as exc:
        return [Error(str(exc), id="sessionflow.E003")]
    try:
        store_config()
    except ConfigurationError as exc:
        return [Error(str(exc), id="sessionflow.E004")]
    return []


@register("sessionflow", Tags.database)
def check_store(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Any]:
    """The store's schema revision, when the database that holds it is checked."""
    if not databases:
        return []
    try:
        if not any(store_alias_for(alias) for alias in databases):
            return []
        config = store_config()
    except ConfigurationError:
        return []  # check_settings reports it
    if config is None:
        return []
    head = migrate.head_revision()
    try:
        revision = ops.db_current(config)["revision"]
    except SessionFlowError as exc:
        return [
            Warning(
                f"cannot read the session store's schema at {config.masked_url}: {exc}",
                hint="Run `manage.py migrate` (it creates the store's tables).",
                id="sessionflow.W001",
            )
        ]
    if revision == head:
        return []
    return [
        Warning(
            f"the session store at {config.masked_url} is at schema revision {revision!r}, "
            f"this sessionflow needs {head!r}",
            hint="Run `manage.py migrate` (or `manage.py sessionflow db upgrade`).",
            id="sessionflow.W001",
        )
    ]

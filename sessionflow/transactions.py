"""Django's ``transaction.on_commit`` for sending when the view's transaction commits."""

from __future__ import annotations

from collections.abc import Callable

from .errors import ConfigurationError


def django_on_commit(action: Callable[[], None]) -> None:
    """Run ``action`` when Django's current transaction commits (at once outside one).

    After a rollback it never runs, as with Celery's ``delay_on_commit``.
    """
    try:
        from django.db import transaction  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "on_commit=True and apply_async_on_commit() need Django (django.db.transaction)"
        ) from None
    from django.core.exceptions import ImproperlyConfigured

    try:
        transaction.on_commit(action)
    except ImproperlyConfigured as exc:
        raise ConfigurationError(
            f"on_commit=True and apply_async_on_commit() need Django's settings: {exc}"
        ) from None

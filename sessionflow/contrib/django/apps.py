"""The Django app: ``"sessionflow.contrib.django"`` in ``INSTALLED_APPS``."""

from __future__ import annotations

import contextlib

from django.apps import AppConfig
from django.db.models.signals import post_migrate

from ...errors import ConfigurationError


class SessionFlowConfig(AppConfig):
    """Reads ``SESSIONFLOW`` into the project's Celery app, registers checks and the
    store's upgrade after ``migrate``."""

    name = "sessionflow.contrib.django"
    label = "sessionflow"
    verbose_name = "Sessions"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .conf import get_flow
        from .schema import on_post_migrate

        post_migrate.connect(on_post_migrate, sender=self, dispatch_uid="sessionflow-upgrade")
        # Settings only: nothing connects until the store is used. An error is left to
        # the system checks, which report it naming the setting.
        with contextlib.suppress(ConfigurationError):
            get_flow()

"""sessionflow for Django: add ``"sessionflow.contrib.django"`` to ``INSTALLED_APPS``.

In the module that creates the Celery app (Celery's Django guide: ``proj/celery.py``)::

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    flow = sessionflow.contrib.django.setup(app)   # reads settings.SESSIONFLOW

and in settings.py ``SESSIONFLOW = {"DATABASE": "default"}`` to keep the store in
that database (see :mod:`.conf` for every key). ``manage.py migrate`` creates and
upgrades the store's tables, ``manage.py sessionflow ...`` is ``celery sessions ...``,
and the admin shows sessions read-only.
"""

from __future__ import annotations

from .conf import celery_app, database_url, get_flow, setup

__all__ = ["celery_app", "database_url", "get_flow", "setup"]

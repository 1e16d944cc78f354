"""Integrations with web frameworks and tools around Celery.

- :mod:`sessionflow.contrib.django`: a Django app (``INSTALLED_APPS``) with settings,
  migrations, a ``manage.py sessionflow`` command, system checks and a read-only admin.
- :mod:`sessionflow.contrib.flask`: ``SessionFlowExt(app, celery)`` for Flask.
- :mod:`sessionflow.contrib.alembic`: keep Alembic autogenerate (and Flask-Migrate)
  away from the store's tables when they share a database with an app's own.
"""

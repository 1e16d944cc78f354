"""The example Flask app: reports built in sessions, one worker per report.

Configuration comes from ``FLASK_*`` environment variables (``app.config.from_prefixed_env``);
without any, everything is local files under ``./data`` and Celery expects Redis:

- ``FLASK_REPORTS_DATA``: folder of the SQLite database and the workers' scratch disks
- ``FLASK_SQLALCHEMY_DATABASE_URI``: the app's database (default ``REPORTS_DATA/reports.db``)
- ``FLASK_SESSIONFLOW_DATABASE_URL``: the session store (default: the app's database)
- ``FLASK_CELERY__broker_url`` / ``FLASK_CELERY__result_backend``: Celery's services
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from sessionflow.contrib.alembic import include_object

from .extensions import celery_init_app, db, migrate, sessionflow

HERE = Path(__file__).resolve().parent.parent


def create_app() -> Flask:
    """The app, its extensions and its Celery app (``app.extensions["celery"]``)."""
    app = Flask(__name__)
    app.config.from_mapping(
        REPORTS_DATA=str(HERE / "data"),
        CELERY={
            "broker_url": "redis://127.0.0.1:6379/0",
            "result_backend": "redis://127.0.0.1:6379/1",
            "broker_connection_retry_on_startup": True,
        },
        SESSIONFLOW_MAX_CONCURRENT_SESSIONS=4,
        SESSIONFLOW_QUEUE_PREFIX="flaskapp",
    )
    app.config.from_prefixed_env()
    data = Path(app.config["REPORTS_DATA"])
    data.mkdir(parents=True, exist_ok=True)
    # A file, not memory: the workers are other processes and must see it.
    app.config.setdefault("SQLALCHEMY_DATABASE_URI", f"sqlite:///{data / 'reports.db'}")
    # The store shares the app's database: its sf_* tables sit next to the app's.
    app.config.setdefault("SESSIONFLOW_DATABASE_URL", app.config["SQLALCHEMY_DATABASE_URI"])

    db.init_app(app)
    # Autogenerate (`flask db migrate`) must never see the store's tables, or it would
    # drop them. Initialised before SessionFlowExt, which adds its include_name too.
    migrate.init_app(app, db, include_object=include_object)
    celery = celery_init_app(app)
    sessionflow.init_app(app, celery)

    from . import views

    app.register_blueprint(views.bp)
    return app

"""The app's extensions, made once and bound to the app in :func:`flaskapp.create_app`."""

from __future__ import annotations

from celery import Celery, Task
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from sessionflow.contrib.flask import SessionFlowExt


class Base(DeclarativeBase):
    """The models' base (SQLAlchemy 2.0 typed mappings)."""


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
sessionflow = SessionFlowExt()


def celery_init_app(app: Flask) -> Celery:
    """Flask's Celery pattern: every task runs inside the app's context."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app

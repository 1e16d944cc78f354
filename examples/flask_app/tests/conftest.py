from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The app's SQLite file and the workers' scratch disks, in a temporary folder. Set in
    the environment before the app is made, so the worker processes inherit it."""
    folder = tmp_path_factory.mktemp("flaskapp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLASK_REPORTS_DATA", str(folder))
        for name in ("FLASK_SQLALCHEMY_DATABASE_URI", "FLASK_SESSIONFLOW_DATABASE_URL"):
            patch.delenv(name, raising=False)
        yield folder


@pytest.fixture(scope="session")
def sessionflow_options(sessionflow_options: dict[str, Any], data_folder: Path) -> dict[str, Any]:
    """The plugin's defaults (embedded broker, temporary store), once the app's data
    folder is set: the plugin imports the app."""
    return sessionflow_options


@pytest.fixture(scope="session")
def flask_app(sessionflow_app: Any) -> Flask:
    """The Flask app whose Celery app the workers run, its tables made by its migrations."""
    from flask_migrate import upgrade
    from make_celery import flask_app

    with flask_app.app_context():
        upgrade()
    return flask_app


@pytest.fixture
def client(flask_app: Flask) -> FlaskClient:
    return flask_app.test_client()

"""``sessionflow.contrib.flask``: the extension's flow outside a request, after_commit."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker

from sessionflow import ConfigurationError, InvalidArgument, SessionFlow
from sessionflow.contrib.flask import SessionFlowExt, after_commit, get_flow


def test_actions_run_after_commit_never_after_rollback() -> None:
    engine = create_engine("sqlite://")
    db = scoped_session(sessionmaker(engine))
    ran: list[str] = []
    after_commit(db, lambda: ran.append("committed"))
    db.commit()
    after_commit(db, lambda: ran.append("rolled back"))
    db.rollback()
    assert ran == ["committed"]
    db.remove()
    engine.dispose()


@pytest.mark.parametrize(
    ("session", "action", "named"),
    [
        (None, "fn", "SQLAlchemy session"),
        ("db", "not callable", "function"),
        ("db", None, "function"),
    ],
)
def test_bad_arguments_are_refused_at_the_call(session: Any, action: Any, named: str) -> None:
    """A non-callable was taken, then failed the application's commit with TypeError and
    skipped the actions registered after it."""
    engine = create_engine("sqlite://")
    db = OrmSession(engine)
    ran: list[str] = []
    with pytest.raises(InvalidArgument, match=named):
        after_commit(
            db if session == "db" else session, (lambda: None) if action == "fn" else action
        )
    after_commit(db, lambda: ran.append("next"))
    db.commit()  # the application's commit still works, and its later actions run
    assert ran == ["next"]
    db.close()
    engine.dispose()


def test_the_flow_of_the_readme_sample_works_outside_a_request(tmp_path: Any) -> None:
    """README: ``flow = sessionflow.flow`` right after ``SessionFlowExt(app, celery)``
    raised "Working outside of application context"."""
    app = Flask("flaskunit")
    app.config["SESSIONFLOW_DATABASE_URL"] = f"sqlite:///{tmp_path / 'f.db'}"
    app.config["SESSIONFLOW_SECRET_KEY"] = "flask-unit-test-secret-0123456789abcdef"
    celery = Celery("flaskunit", broker="memory://", set_as_current=False)
    ext = SessionFlowExt(app, celery)
    try:
        flow = ext.flow
        assert isinstance(flow, SessionFlow) and flow is get_flow(app)
        with app.app_context():
            assert ext.flow is flow and get_flow() is flow
        with pytest.raises(ConfigurationError, match="app context"):
            get_flow()
        with pytest.raises(ConfigurationError, match="Flask app"):
            get_flow(object())  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="Flask app"):
            SessionFlowExt().init_app(None, celery)  # type: ignore[arg-type]
    finally:
        flow.close()
        celery.close()

"""``sessionflow.contrib.flask.after_commit``: actions run after a commit, checked at the call."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker

from sessionflow import InvalidArgument
from sessionflow.contrib.flask import after_commit


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

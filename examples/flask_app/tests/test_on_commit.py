"""``after_commit(db.session, action)``: the action runs when the outermost transaction
commits, never after a rollback, savepoints included (no worker needed)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import select

from flaskapp.extensions import db
from sessionflow.contrib.flask import after_commit


def test_actions_wait_for_the_outermost_commit(flask_app: Flask) -> None:
    ran: list[str] = []
    with flask_app.app_context():
        after_commit(db.session, lambda: ran.append("outer"))
        with db.session.begin_nested():
            after_commit(db.session, lambda: ran.append("released savepoint"))
        savepoint = db.session.begin_nested()
        after_commit(db.session, lambda: ran.append("rolled back savepoint"))
        savepoint.rollback()
        db.session.execute(select(1))
        assert ran == []  # a savepoint released is not a commit
        db.session.commit()
    assert ran == ["outer", "released savepoint"]


def test_a_rollback_or_a_close_drops_the_actions(flask_app: Flask) -> None:
    ran: list[str] = []
    with flask_app.app_context():
        after_commit(db.session, lambda: ran.append("rolled back"))
        db.session.rollback()
        after_commit(db.session, lambda: ran.append("closed"))
        db.session.close()
        db.session.commit()
    assert ran == []

"""sessionflow for Flask: ``SessionFlowExt(app, celery)`` or ``ext.init_app(app, celery)``.

Settings are ``SESSIONFLOW_*`` keys of ``app.config`` (``SESSIONFLOW_DATABASE_URL``,
``SESSIONFLOW_MAX_CONCURRENT_SESSIONS`` …): each becomes the ``sessionflow_*`` setting
of the Celery app; an unknown key is refused, naming it. ``flask sessionflow ...`` is
the ``celery sessions`` command line (``flask sessionflow db upgrade``,
``flask sessionflow list`` …).

When the store shares the app's database, keep Flask-Migrate's autogenerate from
dropping its tables: initialise ``Migrate`` before this extension (it then adds
:func:`sessionflow.contrib.alembic.include_name` to Migrate's settings), or pass
``Migrate(app, db, include_name=include_name)`` yourself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import click
from celery import Celery
from flask import Flask, current_app, has_app_context
from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import SessionTransaction, scoped_session

from ..celery_cli import sessions
from ..config import Config, load_config
from ..errors import ConfigurationError, InvalidArgument
from ..flow import SessionFlow
from .alembic import chain_include_name, include_name, include_object

PREFIX = "SESSIONFLOW_"
EXTENSION = "sessionflow"


def settings_names() -> tuple[str, ...]:
    """The keys of ``app.config`` this extension reads."""
    return tuple(PREFIX + f.name.upper() for f in fields(Config))


def celery_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sessionflow_*`` settings that ``SESSIONFLOW_*`` keys of ``config`` give."""
    known = settings_names()
    found: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"valid keys are {', '.join(known)}"
            raise ConfigurationError(f"unknown Flask setting {key}: {hint}")
        found["sessionflow_" + key[len(PREFIX) :].lower()] = value
    return found


class SessionFlowExt:
    """Attach sessionflow to the Celery app of a Flask app, configured from ``app.config``."""

    def __init__(self, app: Flask | None = None, celery: Celery | None = None) -> None:
        self.celery = celery
        self.app = app  # the app given here (one app); init_app(app) serves any number
        if app is not None:
            self.init_app(app, celery)

    def init_app(self, app: Flask, celery: Celery | None = None) -> SessionFlow:
        """Configure ``celery`` (default: ``app.extensions["celery"]``, as in Flask's Celery
        guide) from ``app.config`` and add ``flask sessionflow``."""
        if not isinstance(app, Flask):
            raise ConfigurationError(f"init_app needs the Flask app, got {type(app).__name__}")
        celery = celery or self.celery or app.extensions.get("celery")
        if not isinstance(celery, Celery):
            raise ConfigurationError(
                "SessionFlowExt needs the Celery app: SessionFlowExt(app, celery), or put it "
                'in app.extensions["celery"] first (Flask\'s Celery guide does)'
            )
        self.celery = celery
        settings = celery_settings(app.config)
        celery.conf.update(settings)
        _validate(celery, settings)
        flow = SessionFlow(celery)
        app.extensions[EXTENSION] = flow
        app.cli.add_command(cli_group(celery))
        exclude_store_from_migrate(app)
        return flow

    @property
    def flow(self) -> SessionFlow:
        """The :class:`SessionFlow` of the current Flask app, else (outside an app
        context) of the app given to ``SessionFlowExt(app, celery)``."""
        if self.app is not None and not has_app_context():
            return get_flow(self.app)
        return get_flow()


def get_flow(app: Flask | None = None) -> SessionFlow:
    """The :class:`SessionFlow` that ``SessionFlowExt`` attached to ``app`` (default: the
    current app)."""
    if app is None:
        if not has_app_context():
            raise ConfigurationError(
                "get_flow() without an app needs a Flask app context; pass the app: get_flow(app)"
            )
        app = current_app
    if not isinstance(app, Flask):
        raise ConfigurationError(f"get_flow needs a Flask app, got {type(app).__name__}")
    flow = app.extensions.get(EXTENSION)
    if not isinstance(flow, SessionFlow):
        raise ConfigurationError(f"{app.name}: SessionFlowExt(app, celery) was not initialised")
    return flow


_LOWER_KEY = re.compile(r"(?:app\.conf\.)?sessionflow_([a-z_]+)")


def _validate(celery: Celery, settings: Mapping[str, Any]) -> None:
    """Validate now, so a wrong value fails at start naming the ``SESSIONFLOW_*`` key."""
    try:
        load_config(celery.conf)
    except ConfigurationError as exc:

        def name(match: re.Match[str]) -> str:
            key = "sessionflow_" + match.group(1)
            return PREFIX + match.group(1).upper() if key in settings else match.group(0)

        raise ConfigurationError(_LOWER_KEY.sub(name, str(exc))) from None


def cli_group(celery: Celery) -> click.Command:
    """``flask sessionflow ARGS``: ``celery sessions ARGS`` on ``celery``."""

    @click.command(
        "sessionflow",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
        help="Operate sessions (the `celery sessions` commands): list, show, complete, fail, "
        "workers, prune, db upgrade|current.",
    )
    @click.pass_context
    def command(ctx: click.Context) -> None:
        sessions.main(
            args=list(ctx.args),
            prog_name=f"{ctx.find_root().info_name or 'flask'} sessionflow",
            obj=SimpleNamespace(app=celery),
            standalone_mode=True,
        )

    return command


def exclude_store_from_migrate(app: Flask) -> bool:
    """Add the store's ``include_name`` to Flask-Migrate's autogenerate settings, if
    ``Migrate`` was initialised on ``app``; True if it was."""
    migrate = app.extensions.get("migrate")
    configure_args = getattr(migrate, "configure_args", None)
    if not isinstance(configure_args, dict):
        return False
    current = configure_args.get("include_name")
    if not getattr(current, "sessionflow_chained", False) and current is not include_name:
        configure_args["include_name"] = chain_include_name(current)
    return True


# -- dispatching after a commit ----------------------------------------------------------

_PENDING = "sessionflow_after_commit"  # [(transaction, action)] in session.info
_COMMITTED = "sessionflow_committed"  # transactions that committed, until they end
_listening = False


def after_commit(session: Any, action: Callable[[], Any]) -> None:
    """Run ``action`` when the SQLAlchemy ``session``'s transaction commits (Flask-SQLAlchemy:
    ``db.session``); after a rollback it never runs. Django's ``on_commit``, for SQLAlchemy::

        after_commit(db.session, lambda: flow.request_session(...))

    Inside a savepoint (``begin_nested()``) the action belongs to it: dropped if the
    savepoint rolls back, run only when the outermost transaction commits.
    """
    if not callable(action):
        raise InvalidArgument(f"after_commit needs a function to run, got {type(action).__name__}")
    if isinstance(session, scoped_session):
        session = session()
    if not isinstance(session, OrmSession):
        raise InvalidArgument(
            "after_commit needs a SQLAlchemy session (Flask-SQLAlchemy: db.session), "
            f"got {type(session).__name__}"
        )
    _listen()
    # The action belongs to the innermost transaction, begun now if none is (as the
    # session's next statement would), so that ending without a commit drops it.
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        transaction = session.begin()
    session.info.setdefault(_PENDING, []).append((transaction, action))


def _listen() -> None:
    global _listening
    if _listening:
        return
    event.listen(OrmSession, "after_commit", _committed)
    event.listen(OrmSession, "after_transaction_end", _ended)
    _listening = True


def _committed(session: OrmSession) -> None:
    # Fired for the outermost transaction and for each savepoint released, before it ends.
    if _PENDING in session.info:
        transaction = session.get_nested_transaction() or session.get_transaction()
        session.info.setdefault(_COMMITTED, set()).add(transaction)


def _ended(session: OrmSession, transaction: SessionTransaction) -> None:
    if transaction.parent is not None and not transaction.nested:
        return  # an inner subtransaction: its savepoint or outermost transaction decides
    committed = transaction in session.info.get(_COMMITTED, ())
    session.info.get(_COMMITTED, set()).discard(transaction)
    pending = session.info.get(_PENDING)
    if not pending:
        return
    enclosing = transaction.parent
    while enclosing is not None and enclosing.parent is not None and not enclosing.nested:
        enclosing = enclosing.parent
    kept, due = [], []
    for owner, action in pending:
        if owner is not transaction:
            kept.append((owner, action))
        elif committed and enclosing is not None:
            kept.append((enclosing, action))  # a released savepoint: now the outer one's
        elif committed:
            due.append(action)
    if kept:
        session.info[_PENDING] = kept
    else:
        session.info.pop(_PENDING, None)
    for action in due:
        action()


__all__ = [
    "SessionFlowExt",
    "after_commit",
    "celery_settings",
    "exclude_store_from_migrate",
    "get_flow",
    "include_name",
    "include_object",
]

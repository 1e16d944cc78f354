"""``sessionflow`` command line: ``sessionflow db upgrade|current`` for deploy scripts.

The same commands as ``celery -A proj sessions db ...`` (:mod:`.celery_cli`), usable
without an app module (``--url``). Everything else lives under ``celery sessions``.
"""

from __future__ import annotations

import click
from celery import Celery
from celery.app.utils import find_app
from celery.utils.imports import import_from_cwd, symbol_by_name

from . import __version__, ops
from .celery_cli import render_db, render_list
from .config import Config
from .errors import SessionFlowError
from .flow import SessionFlow


def _config(url: str | None, app: str | None) -> Config:
    """The store to act on: ``--url``, or the one ``-A app`` sets (never an implicit default)."""
    if url and app:
        raise click.UsageError("give --url or -A/--app, not both")
    try:
        return ops.store_config(_find_app(app) if app else None, url)
    except ops.StoreNotConfigured as exc:
        raise click.UsageError(str(exc)) from None
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from None


def _find_app(name: str) -> Celery:
    """Find a Celery app the way ``celery -A`` does (module, module:attr, cwd on path)."""
    try:
        app = find_app(name, symbol_by_name=symbol_by_name, imp=import_from_cwd)
    except Exception as exc:
        raise click.ClickException(f"cannot load the Celery app {name!r}: {exc}") from exc
    if not isinstance(app, Celery):
        raise click.ClickException(f"{name!r} is not a Celery app")
    return app


_url = click.option("--url", help="SQLAlchemy database URL of the session store.")
_app = click.option("-A", "--app", help="Celery app (module or module:attr) to read settings from.")


@click.group()
@click.version_option(__version__, prog_name="sessionflow", message="%(prog)s %(version)s")
def main() -> None:
    """sessionflow: Temporal-style worker sessions for Celery."""


@main.group()
def db() -> None:
    """Manage the session store's schema."""


@db.command()
@_url
@_app
def upgrade(url: str | None, app: str | None) -> None:
    """Apply all pending migrations (same as celery -A proj sessions db upgrade)."""
    config = _config(url, app)
    click.echo(f"upgrading the session store at {config.masked_url}")
    try:
        done = ops.db_upgrade(config)
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render_db(done))


@db.command()
@_url
@_app
def current(url: str | None, app: str | None) -> None:
    """Print the schema revision in force (same as celery -A proj sessions db current)."""
    config = _config(url, app)
    try:
        done = ops.db_current(config)
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render_db(done))


@main.command("sessions", hidden=True)
@click.option("--state", type=click.Choice(["open", "closed", "failed"]))
@click.option("--user-id")
@click.option("--hostname")
@click.option("-A", "--app", "app_name", required=True, help="Celery app (module or module:attr).")
def sessions_cmd(
    state: str | None, user_id: str | None, hostname: str | None, app_name: str
) -> None:
    """0.1's session listing; use celery -A proj sessions list."""
    flow = SessionFlow(_find_app(app_name))
    try:
        ops.existing_store(flow.config)
        found = ops.list_sessions(
            flow, state=state, user_id=user_id, hostname=hostname, limit=100_000
        )
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render_list(found))


if __name__ == "__main__":
    main()

"""``sessionflow`` command line: thin wrappers over library calls."""

from __future__ import annotations

import os

import click
from celery import Celery
from celery.app.utils import find_app
from celery.utils.imports import import_from_cwd, symbol_by_name

from . import __version__
from .config import DEFAULT_DATABASE_URL, Config, check_database_url, load_config
from .errors import SessionFlowError
from .flow import SessionFlow
from .store.sql import SQLStore


def _config(url: str | None, app: str | None) -> Config:
    if url and app:
        raise click.UsageError("give --url or -A/--app, not both")
    try:
        if app:
            return load_config(_find_app(app).conf)
        if url:
            check_database_url(url)
            return Config(database_url=url)
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from None
    default = os.path.abspath(DEFAULT_DATABASE_URL.removeprefix("sqlite:///"))
    raise click.UsageError(
        "which session store? Pass --url URL, or -A yourapp to use the store the app "
        f"configures (without sessionflow_database_url an app uses {DEFAULT_DATABASE_URL}, "
        f"which here would be {default})"
    )


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
    """Apply all pending migrations."""
    config = _config(url, app)
    click.echo(f"upgrading the session store at {config.masked_url}")
    try:
        revision = SQLStore(config).upgrade()
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"session store at {config.masked_url} is at revision {revision}")


@db.command()
@_url
@_app
def current(url: str | None, app: str | None) -> None:
    """Print the schema revision in force (changes nothing)."""
    config = _config(url, app)
    try:
        revision = SQLStore(config).revision()
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"session store at {config.masked_url} is at revision {revision or 'none'}")


@main.command("sessions")
@click.option("--state", type=click.Choice(["open", "closed", "failed"]))
@click.option("--user-id")
@click.option("--hostname")
@click.option("-A", "--app", "app_name", required=True, help="Celery app (module or module:attr).")
def sessions_cmd(
    state: str | None, user_id: str | None, hostname: str | None, app_name: str
) -> None:
    """List sessions."""
    flow = SessionFlow(_find_app(app_name))
    try:
        for session in flow.list_sessions(state=state, user_id=user_id, hostname=hostname):
            info = session.info
            click.echo(
                f"{info.session_id}  {info.state.value:<7} {info.hostname}  {info.reason or ''}"
            )
    except SessionFlowError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()

"""``celery -A proj sessions ...``: operate sessions with Celery's own command line.

Registered through the ``celery.commands`` entry point (as Flower registers
``celery flower``); Celery hands the app over as ``ctx.obj.app``. Each command
parses, calls :mod:`sessionflow.ops`, and prints the result: an aligned table for
people (rendered by :mod:`sessionflow.cli_render`), or JSON with ``--json``. Exit
codes: 0 ok, 1 an error (one line on stderr), 2 a usage error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from celery import Celery

from . import limits, ops
from .canvas import BROKER_DOWN, broker_error
from .cli_render import (
    duration,
    render_db,
    render_ended,
    render_list,
    render_prune,
    render_show,
    render_workers,
    table,
)
from .enums import Reason, SessionStatus
from .errors import SessionFlowError
from .flow import SessionFlow

F = TypeVar("F", bound=Callable[..., Any])


# -- plumbing ----------------------------------------------------------------------------


def _app(ctx: click.Context) -> Celery:
    app = getattr(ctx.obj, "app", None)
    if not isinstance(app, Celery):
        raise click.UsageError("no Celery app: run it as celery -A proj sessions ...")
    return app


def _flow(ctx: click.Context) -> SessionFlow:
    """The app's SessionFlow, with a store that exists (never created by reading)."""
    app = _app(ctx)
    flow = SessionFlow.of(app)
    if flow is None:
        raise click.UsageError(
            f"the app {app.main or '(default)'!r} does not use sessionflow: pass -A with the "
            "module that calls SessionFlow(app), e.g. celery -A proj sessions list"
        )
    ops.existing_store(flow.config)
    return flow


def _errors(command: F) -> F:
    """Library errors become one line on stderr and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ops.StoreNotConfigured as exc:
            raise click.UsageError(str(exc)) from None
        except SessionFlowError as exc:
            raise click.ClickException(_one_line(exc)) from None
        except BROKER_DOWN as exc:
            error = broker_error(_app(click.get_current_context()), exc)
            raise click.ClickException(str(error)) from None

    return wrapper  # type: ignore[return-value]


def _one_line(exc: BaseException) -> str:
    """An error message on one line (database drivers like to add a second)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


_json = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return ops.parse_duration(value)
    except SessionFlowError as exc:
        raise click.BadParameter(str(exc)) from None


def _seconds(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return limits.seconds("seconds", float(value)) or 0.0
    except (ValueError, OverflowError, SessionFlowError):
        raise click.BadParameter(f"use a positive number of seconds, got {value!r}") from None


def _emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else render(data))


# -- the group ------------------------------------------------------------------------------


@click.group(name="sessions")
def sessions(**_: Any) -> None:
    """Operate sessionflow sessions: list, show, end, workers, prune, db."""


@sessions.command("list")
@click.option("--state", type=click.Choice(ops.STATES), help="Only sessions in this state.")
@click.option("--user", "user_id", help="Only sessions of this user_id.")
@click.option("--agent", "agent_id", help="Only sessions of this agent_id.")
@click.option("--worker", "hostname", help="Only sessions of this worker (node name).")
@click.option(
    "--older-than", callback=_duration, metavar="DURATION", help="Created before, e.g. 1h."
)
@click.option(
    "--newer-than", callback=_duration, metavar="DURATION", help="Created within, e.g. 15m."
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@_json
@click.pass_context
@_errors
def list_cmd(
    ctx: click.Context,
    state: str | None,
    user_id: str | None,
    agent_id: str | None,
    hostname: str | None,
    older_than: float | None,
    newer_than: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """Sessions, newest first."""
    data = ops.list_sessions(
        _flow(ctx),
        state=state,
        user_id=user_id,
        agent_id=agent_id,
        hostname=hostname,
        older_than=older_than,
        newer_than=newer_than,
        limit=limit,
    )
    _emit(data, as_json, render_list)


@sessions.command("show")
@click.argument("session_id")
@click.option("--values", is_flag=True, help="Show state values, not only keys and sizes.")
@click.option("--history", type=click.IntRange(1, 100_000), default=100, show_default=True)
@_json
@click.pass_context
@_errors
def show_cmd(
    ctx: click.Context, session_id: str, values: bool, history: int, as_json: bool
) -> None:
    """One session: its info, tasks, run history and state keys."""
    data = ops.show_session(_flow(ctx), session_id, values=values, history=history)
    _emit(data, as_json, render_show)


def _end(
    ctx: click.Context, ids: Sequence[str], status: SessionStatus, reason: str, as_json: bool
) -> None:
    results = ops.end_sessions(_flow(ctx), ids, status, reason)
    _emit(results, as_json, render_ended)
    failed = [r for r in results if r["outcome"] in ("not_found", "not_open")]
    if failed:
        what = ", ".join(f"{r['session_id']} ({r['outcome'].replace('_', ' ')})" for r in failed)
        raise click.ClickException(f"{len(failed)} of {len(results)} not ended: {what}")


@sessions.command("complete")
@click.argument("session_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--reason", default=Reason.COMPLETED.value, show_default=True)
@_json
@click.pass_context
@_errors
def complete_cmd(
    ctx: click.Context, session_ids: tuple[str, ...], reason: str, as_json: bool
) -> None:
    """Close open sessions, as complete() does: their unstarted tasks do not run."""
    _end(ctx, session_ids, SessionStatus.CLOSED, reason, as_json)


@sessions.command("fail")
@click.argument("session_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--reason", required=True, help="Why, kept as the sessions' reason.")
@_json
@click.pass_context
@_errors
def fail_cmd(ctx: click.Context, session_ids: tuple[str, ...], reason: str, as_json: bool) -> None:
    """Fail open sessions: their unstarted tasks do not run (SessionFailed)."""
    _end(ctx, session_ids, SessionStatus.FAILED, reason, as_json)


@sessions.command("workers")
@click.option("--worker", "names", multiple=True, help="Only this worker (repeatable).")
@click.option(
    "-t",
    "--timeout",
    callback=_seconds,
    default="1",
    show_default=True,
    help="Seconds to wait for the workers' inspect answers.",
)
@_json
@click.pass_context
@_errors
def workers_cmd(ctx: click.Context, names: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Workers: the store's record next to each worker's live answer."""
    data = ops.workers(_flow(ctx), timeout=timeout, names=names)
    _emit(data, as_json, render_workers)


@sessions.command("prune")
@click.option(
    "--older-than",
    callback=_duration,
    metavar="DURATION",
    help="Ended longer ago than this (default: sessionflow_retention).",
)
@click.option("--yes", is_flag=True, help="Delete them (without it, only count).")
@_json
@click.pass_context
@_errors
def prune_cmd(ctx: click.Context, older_than: float | None, yes: bool, as_json: bool) -> None:
    """What retention deletes: ended sessions with their tasks, runs and state."""
    data = ops.prune(_flow(ctx), older_than=older_than, apply=yes)
    _emit(data, as_json, render_prune)


# -- db ------------------------------------------------------------------------------------


@sessions.group("db")
def db() -> None:
    """The session store's schema (migrations)."""


_url = click.option("--url", help="SQLAlchemy URL of the store (default: the app's).")


@db.command("upgrade")
@_url
@_json
@click.pass_context
@_errors
def db_upgrade_cmd(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Apply pending migrations (run once per release, before the workers start)."""
    config = ops.store_config(getattr(ctx.obj, "app", None), url)
    if not as_json:
        click.echo(f"upgrading the session store at {config.masked_url}")
    _emit(ops.db_upgrade(config), as_json, render_db)


@db.command("current")
@_url
@_json
@click.pass_context
@_errors
def db_current_cmd(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Print the schema revision in force (changes nothing)."""
    config = ops.store_config(getattr(ctx.obj, "app", None), url)
    _emit(ops.db_current(config), as_json, render_db)


__all__ = ["duration", "render_db", "render_list", "sessions", "table"]

"""``celery -A proj sessions ...``: operate sessions with Celery's own command line.

Registered through the ``celery.commands`` entry point (as Flower registers
``celery flower``); Celery hands the app over as ``ctx.obj.app``. Each command
parses, calls :mod:`sessionflow.ops`, and prints the result: an aligned table for
people, or JSON with ``--json``. Exit codes: 0 ok, 1 an error (one line on
stderr), 2 a usage error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from celery import Celery
from kombu.exceptions import OperationalError

from . import ops
from .enums import Reason, SessionStatus
from .errors import SessionFlowError
from .flow import SessionFlow

F = TypeVar("F", bound=Callable[..., Any])
EMPTY = "-"


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
        except (OperationalError, ConnectionError, TimeoutError) as exc:
            ctx = click.get_current_context()
            broker = _app(ctx).connection().as_uri()  # as_uri() masks the password
            message = f"cannot reach the broker at {broker}: {_one_line(exc)}"
            raise click.ClickException(message) from None

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


def _emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else render(data))


# -- formatting ----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned under upper-case headers; ``-`` for nothing."""
    cells = [[EMPTY if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def duration(seconds: float | None) -> str:
    """``7ms``, ``4.2s``, ``42s``, ``5m07s``, ``3h02m``, ``2d04h``."""
    if seconds is None:
        return EMPTY
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def timestamp(value: str | None) -> str:
    """An ISO timestamp from :mod:`ops` as ``2030-01-01 12:00:00Z``."""
    return EMPTY if not value else value[:19].replace("T", " ") + "Z"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


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


def render_list(data: dict[str, Any]) -> str:
    found = data["sessions"]
    if not found:
        return "no sessions match"
    text = table(
        ["SESSION", "STATE", "WORKER", "USER", "AGENT", "TURNS", "AGE", "REASON"],
        [
            [
                s["session_id"],
                s["state"] + (" (moving)" if s["moving"] else ""),
                s["hostname"],
                s["user_id"],
                s["agent_id"],
                s["turns"] if s["max_turns"] is None else f"{s['turns']}/{s['max_turns']}",
                duration(s["age"]),
                s["reason"],
            ]
            for s in found
        ],
    )
    if data["more"]:
        text += f"\n(the newest {data['limit']} shown; more match: raise --limit)"
    return text


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


def render_show(data: dict[str, Any]) -> str:
    s = data["session"]
    info = [
        ("session", s["session_id"]),
        ("state", s["state"] + (" (moving to another worker)" if s["moving"] else "")),
        ("reason", s["reason"]),
        ("worker", s["hostname"]),
        ("queue", s["queue"]),
        ("user", s["user_id"]),
        ("agent", s["agent_id"]),
        ("turns", s["turns"] if s["max_turns"] is None else f"{s['turns']} of {s['max_turns']}"),
        ("created", f"{timestamp(s['created_at'])} ({duration(s['age'])} ago)"),
        ("opened", timestamp(s["opened_at"])),
        ("deadline", timestamp(s["deadline_at"])),
        ("closed", timestamp(s["closed_at"])),
        ("heartbeat", f"{duration(s['heartbeat_age'])} ago" if s["heartbeat_age"] else None),
        ("metadata", json.dumps(s["metadata"]) if s["metadata"] else None),
    ]
    width = max(len(k) for k, _ in info)
    parts = ["\n".join(f"{k:<{width}}  {EMPTY if v in (None, '') else v}" for k, v in info)]
    tasks = data["tasks"]
    parts.append(
        f"{plural(len(tasks), 'task')}\n"
        + (
            table(
                ["TASK", "NAME", "STATUS", "WORKER", "DISPATCHED", "STARTED", "FINISHED"],
                [
                    [
                        t["task_id"],
                        t["name"],
                        t["status"],
                        t["worker"],
                        timestamp(t["dispatched_at"]),
                        timestamp(t["started_at"]),
                        timestamp(t["finished_at"]),
                    ]
                    for t in tasks
                ],
            )
            if tasks
            else "no tasks"
        )
    )
    runs = data["history"]
    parts.append(
        f"history: {plural(len(runs), 'run')}\n"
        + (
            table(
                ["TASK", "NAME", "STATE", "WORKER", "STARTED", "RUNTIME", "ERROR"],
                [
                    [
                        r["task_id"],
                        r["name"],
                        r["state"],
                        r["worker"],
                        timestamp(r["started_at"]),
                        duration(r["runtime"]),
                        r["error"],
                    ]
                    for r in runs
                ],
            )
            if runs
            else "no runs"
        )
    )
    keys = data["state"]
    with_values = any("value" in k for k in keys)
    headers = ["KEY", "SCOPE", "SIZE", "VERSION"] + (["VALUE"] if with_values else [])
    parts.append(
        f"state: {plural(len(keys), 'key')}\n"
        + (
            table(
                headers,
                [
                    [k["key"], k["scope"], _size(k["size"]), k["version"]]
                    + ([json.dumps(k.get("value"))] if with_values else [])
                    for k in keys
                ],
            )
            if keys
            else "no keys"
        )
    )
    return "\n\n".join(parts)


def _end(
    ctx: click.Context, ids: Sequence[str], status: SessionStatus, reason: str, as_json: bool
) -> None:
    results = ops.end_sessions(_flow(ctx), ids, status, reason)
    _emit(results, as_json, render_ended)
    failed = [r for r in results if r["outcome"] in ("not_found", "not_open")]
    if failed:
        what = ", ".join(f"{r['session_id']} ({r['outcome'].replace('_', ' ')})" for r in failed)
        raise click.ClickException(f"{len(failed)} of {len(results)} not ended: {what}")


def render_ended(results: list[dict[str, Any]]) -> str:
    shown = {
        "ended": "ended",
        "already_ended": "had ended",
        "not_open": "not open yet",
        "not_found": "not found",
    }
    return table(
        ["SESSION", "RESULT", "STATE", "REASON", "WORKER"],
        [
            [r["session_id"], shown[r["outcome"]], r["state"], r["reason"], r["hostname"]]
            for r in results
        ],
    )


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
    type=float,
    default=1.0,
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


def render_workers(data: dict[str, Any]) -> str:
    rows = []
    for w in data["workers"]:
        store, live = w["store"] or {}, w["live"]
        if live is not None:
            admission = "paused" if live["admission_paused"] else "taking requests"
            free = live["free"]
        else:
            admission = f"error: {w['live_error']}" if w["live_error"] else "no answer"
            free = store.get("free")
        rows.append(
            [
                w["nodename"],
                store.get("status", "not in store"),
                duration(store.get("heartbeat_age")) if store else None,
                store.get("pid"),
                f"{store.get('cap', EMPTY)}/{EMPTY if live is None else live['cap']}",
                f"{store.get('open', EMPTY)}/{EMPTY if live is None else live['open']}",
                free,
                admission,
            ]
        )
    if not rows:
        text = "no workers match"
    else:
        text = table(
            [
                "WORKER",
                "STATUS",
                "HEARTBEAT",
                "PID",
                "CAP STORE/LIVE",
                "OPEN STORE/LIVE",
                "FREE",
                "ADMISSION",
            ],
            rows,
        )
    if not data["answered"]:
        text += (
            f"\nno worker answered `inspect sessions` within {data['timeout']} s "
            "(are they running, on this broker, with SessionFlow(app)?)"
        )
    return text


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


def render_prune(data: dict[str, Any]) -> str:
    when = f"ended before {timestamp(data['ended_before'])} ({duration(data['older_than'])} ago)"
    if not data["sessions"]:
        return f"no sessions {when}: nothing to prune"
    counts = (
        f"{plural(data['sessions'], 'session')} {when}, with {plural(data['tasks'], 'task')}, "
        f"{plural(data['runs'], 'run')} and {plural(data['state_keys'], 'state key')}"
    )
    if data["deleted"]:
        return f"deleted {counts}"
    return f"would delete {counts}\nrun again with --yes to delete them"


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


def render_db(data: dict[str, Any]) -> str:
    return f"session store at {data['url']} is at revision {data['revision'] or 'none'}"


__all__ = ["duration", "sessions", "table"]

"""``manage.py sessionflow ...``: the ``celery sessions`` command line, on the project's app.

``manage.py sessionflow list --state open``, ``show ID``, ``complete ID``, ``fail ID
--reason TEXT``, ``workers``, ``prune``, ``db upgrade|current``: the same commands,
options, output and exit codes as ``celery -A proj sessions ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from types import SimpleNamespace
from typing import Any

import click
from django.core.management.base import BaseCommand, CommandError

from sessionflow.celery_cli import sessions
from sessionflow.contrib.django.conf import get_flow
from sessionflow.errors import ConfigurationError


class Command(BaseCommand):
    help = "Operate sessionflow sessions (the `celery sessions` commands): list, show, ..."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.add_argument(
            "args", nargs=argparse.REMAINDER, help="a `celery sessions` command and its options"
        )
        return parser

    def run_from_argv(self, argv: list[str]) -> None:
        """From the shell: hand everything after the command name to click (--help too)."""
        try:
            _run(argv[2:], prog_name=f"{_prog(argv[0])} {argv[1]}", standalone=True)
        except CommandError as exc:
            self.stderr.write(f"Error: {exc}")
            sys.exit(exc.returncode)

    def handle(self, *args: str, **options: Any) -> None:
        """From ``call_command("sessionflow", "list", "--json")``: errors as CommandError."""
        _run(list(args), prog_name="manage.py sessionflow", standalone=False, out=self.stdout)


def _prog(path: str) -> str:
    return path.rsplit("/", 1)[-1] or "manage.py"


def _run(args: list[str], prog_name: str, standalone: bool, out: Any = None) -> None:
    try:
        app = get_flow().app
    except ConfigurationError as exc:
        raise CommandError(str(exc)) from None
    obj = SimpleNamespace(app=app)
    if standalone:
        sessions.main(args=args, prog_name=prog_name, obj=obj, standalone_mode=True)
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            sessions.main(args=args, prog_name=prog_name, obj=obj, standalone_mode=False)
    except click.exceptions.Exit as exc:
        if exc.exit_code:
            raise CommandError(f"exit status {exc.exit_code}", returncode=exc.exit_code) from None
    except click.ClickException as exc:
        raise CommandError(exc.format_message(), returncode=exc.exit_code) from None
    finally:
        if out is not None and printed.getvalue():
            out.write(printed.getvalue(), ending="")

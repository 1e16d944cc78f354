"""The command lines, and Flask-Migrate's autogenerate next to the session store's tables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import produce_migrations, render_python_code
from alembic.runtime.migration import MigrationContext
from flask import Flask
from sqlalchemy import create_engine, inspect

from flaskapp.models import Report

HERE = Path(__file__).resolve().parent.parent


def flask(*args: str, data: Path) -> str:
    """``flask --app flaskapp ARGS`` with the app's data (and the store) in ``data``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env["FLASK_REPORTS_DATA"] = str(data)
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "flaskapp", *args],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def store_tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {name for name in inspect(engine).get_table_names() if name.startswith("sf_")}
    finally:
        engine.dispose()


def test_flask_sessionflow_db_upgrade_makes_the_store(tmp_path: Path) -> None:
    out = flask("sessionflow", "db", "upgrade", data=tmp_path)
    assert f"upgrading the session store at sqlite:///{tmp_path / 'reports.db'}" in out
    revision = flask("sessionflow", "db", "current", data=tmp_path).strip().split()[-1]
    assert revision != "none"
    assert "sf_sessions" in store_tables(f"sqlite:///{tmp_path / 'reports.db'}")


def test_autogenerate_leaves_the_store_tables_alone(tmp_path: Path, flask_app: Flask) -> None:
    # One database holding both: the app's tables (its migrations) and the store's.
    flask("db", "upgrade", data=tmp_path)
    flask("sessionflow", "db", "upgrade", data=tmp_path)
    url = f"sqlite:///{tmp_path / 'reports.db'}"
    tables = store_tables(url)
    assert "sf_sessions" in tables

    # `flask db migrate` as a user runs it, into a copy of the migrations.
    migrations = tmp_path / "migrations"
    shutil.copytree(HERE / "migrations", migrations, ignore=shutil.ignore_patterns("__pycache__"))
    before = set((migrations / "versions").glob("*.py"))
    out = flask("db", "migrate", "-d", str(migrations), "-m", "nothing", data=tmp_path)
    assert "No changes in schema detected" in out, out
    assert set((migrations / "versions").glob("*.py")) == before, out

    # The same comparison in this process, with the app's hooks and without them.
    hooks = {
        name: hook
        for name, hook in flask_app.extensions["migrate"].configure_args.items()
        if name in ("include_name", "include_object")
    }
    assert hooks, "Migrate was initialised without sessionflow's hooks"
    with_hooks = autogenerate(url, hooks)
    # Nothing to do at all: the app's tables match its models, the store's are not seen.
    assert "op." not in with_hooks, with_hooks
    without = autogenerate(url, {})
    assert "'reports'" not in without, without
    for table in tables:  # the test can fail: without the hooks every store table is dropped
        assert f"op.drop_table('{table}')" in without, without


def autogenerate(url: str, hooks: dict[str, object]) -> str:
    """The upgrade() that autogenerate would write for ``url`` against the app's models."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True, **hooks})
            ops = produce_migrations(context, Report.metadata).upgrade_ops
            assert ops is not None
            return render_python_code(ops)
    finally:
        engine.dispose()

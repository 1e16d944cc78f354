"""The ``sessionflow`` command: it names the store it acts on and refuses what it cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sessionflow.cli import main
from sessionflow.store.sql.migrate import head_revision

HEAD = head_revision()  # the revision a fresh store is at


def run(*args: str, cwd: Path) -> tuple[int, str]:
    """Invoke the command in an empty folder ``cwd``; report files it left there."""
    folder = cwd / "cwd"
    folder.mkdir(exist_ok=True)
    before = set(folder.iterdir())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = CliRunner().invoke(main, list(args))
    created = sorted(p.name for p in set(folder.iterdir()) - before)
    return result.exit_code, result.output + ("" if not created else f"\nFILES: {created}")


def test_db_upgrade_without_a_store_creates_nothing(tmp_path: Path) -> None:
    code, output = run("db", "upgrade", cwd=tmp_path)
    assert code == 2  # a usage error
    assert "--url" in output and "-A" in output and "sqlite:///sessionflow.db" in output
    assert "FILES" not in output  # no implicit ./sessionflow.db


def test_db_upgrade_names_the_store_and_the_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    code, output = run("db", "upgrade", "--url", url, cwd=tmp_path)
    assert code == 0, output
    assert f"session store at {url} is at revision {HEAD}" in output
    code, output = run("db", "current", "--url", url, cwd=tmp_path)
    assert code == 0 and f"revision {HEAD}" in output


@pytest.mark.parametrize("url", ["mysql+pymysql://root:pw-x@127.0.0.1/test", "mariadb://u@h/db"])
def test_db_upgrade_refuses_mysql(tmp_path: Path, url: str) -> None:
    code, output = run("db", "upgrade", "--url", url, cwd=tmp_path)
    assert code == 1
    assert "MySQL/MariaDB cannot serve" in output and "pw-x" not in output


def test_db_commands_mask_the_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://bob:pw-never-shown@127.0.0.1:1/nothing"
    code, output = run("db", "upgrade", "--url", url, cwd=tmp_path)
    assert code == 1
    assert "bob:***@127.0.0.1:1/nothing" in output and "pw-never-shown" not in output


def test_db_commands_mask_a_password_in_the_query_string(tmp_path: Path) -> None:
    url = "postgresql+psycopg://bob@127.0.0.1:1/nothing?password=pw-never-shown"
    code, output = run("db", "upgrade", "--url", url, cwd=tmp_path)
    assert code == 1
    assert "password=***" in output and "pw-never-shown" not in output


def test_url_and_app_together_is_a_usage_error(tmp_path: Path) -> None:
    code, output = run("db", "upgrade", "--url", "sqlite://", "-A", "proj", cwd=tmp_path)
    assert code == 2 and "not both" in output

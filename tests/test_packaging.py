"""The wheel ships the migrations, and ``sessionflow db upgrade`` works from the shell."""

from __future__ import annotations

import importlib.util
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sessionflow import migrate

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations"


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built without network from a copy of the sources (keeps the tree clean)."""
    missing = [name for name in ("setuptools", "wheel") if importlib.util.find_spec(name) is None]
    assert not missing, (
        f"{', '.join(missing)} not installed in {sys.prefix}: add 'setuptools>=68' and "
        "'wheel' to the test extras in pyproject.toml"
    )
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for name in ("sessionflow", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
        ],
        cwd=src,
    )
    assert done.returncode == 0, f"wheel build failed:\n{done.stdout}\n{done.stderr}"
    wheels = list(out.glob("sessionflow-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = sorted(MIGRATIONS.glob("versions/*.py"))
    assert len(versions) >= 3  # __init__.py and at least two revisions
    expected = {
        "sessionflow/migrations/__init__.py",
        "sessionflow/migrations/env.py",
        "sessionflow/migrations/script.py.mako",
        "sessionflow/py.typed",
        *(f"sessionflow/migrations/versions/{path.name}" for path in versions),
    }
    assert expected <= names, sorted(expected - names)


def test_wheel_migrations_reach_head(wheel: Path, tmp_path: Path) -> None:
    """The installed wheel (not this source tree) finds its own migrations and head."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import sessionflow.migrate as m\n"
        "assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
        "print(m.head_revision())\n"
    )
    done = run([sys.executable, "-c", code, str(site)], cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == migrate.head_revision()


def cli() -> list[str]:
    script = Path(sys.executable).with_name("sessionflow")
    assert script.exists(), f"{script} missing: install the package (pip install -e .[test])"
    return [str(script)]


def schema(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()


def test_cli_db_upgrade_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    url = f"sqlite:///{db}"
    head = migrate.head_revision()
    first = run([*cli(), "db", "upgrade", "--url", url], cwd=tmp_path, timeout=60)
    assert first.returncode == 0, first.stderr
    assert head in first.stdout
    before = schema(db)
    assert {"sf_sessions", "sf_workers", "sf_session_tasks"} <= {name for name, _ in before}
    second = run([*cli(), "db", "upgrade", "--url", url], cwd=tmp_path, timeout=60)
    assert second.returncode == 0, second.stderr
    assert head in second.stdout
    assert schema(db) == before  # a no-op
    with sqlite3.connect(db) as conn:
        versions = conn.execute(f"SELECT version_num FROM {migrate.VERSION_TABLE}").fetchall()
    assert versions == [(head,)]


def test_cli_db_upgrade_unusable_url_is_a_clean_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"
    done = run([*cli(), "db", "upgrade", "--url", url], cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error:")

"""The wheel ships the migrations, ``sessionflow db upgrade`` works from the shell, and the
wheel installed from PyPI with only the ``redis`` extra runs a real worker."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest

from harness import REDIS_URL, service_up
from sessionflow.store.sql import migrate

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations"
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
REDIS_DB = 14  # this module's own Redis database (the integration stacks use 12 and 13)


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built without network from a copy of the sources (keeps the tree clean)."""
    missing = [name for name in ("setuptools", "wheel") if importlib.util.find_spec(name) is None]
    assert not missing, (
        f"{', '.join(missing)} not installed in {sys.prefix}: add 'setuptools>=77' and "
        "'wheel' to the test extras in pyproject.toml"
    )
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
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


def test_wheel_declares_an_spdx_license(wheel: Path) -> None:
    """PEP 639: an SPDX expression and the license text (setuptools stops accepting the
    ``license = {text = ...}`` table on 2027-02-18)."""
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines(), metadata[:800]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    text = archive.read(next(n for n in names if n.endswith("licenses/LICENSE"))).decode()
    assert text.startswith("MIT License")


def test_wheel_migrations_reach_head(wheel: Path, tmp_path: Path) -> None:
    """The installed wheel (not this source tree) finds its own migrations and head."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import sessionflow.store.sql.migrate as m\n"
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


# -- the wheel in a fresh venv, installed from the package index -------------------------


def index_unreachable() -> str | None:
    """Why pip's package index cannot be reached from here, or None if it can."""
    url = INDEX_URL.split()[0].rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            response.read(1)
    except (OSError, ValueError) as exc:  # URLError and socket errors are OSErrors
        return f"package index {url} not reachable ({exc})"
    return None


def require(problem: str | None) -> None:
    """Skip locally when ``problem`` is set; under CI=true it is a failure."""
    if problem is None:
        return
    if CI:
        pytest.fail(f"CI=true but {problem}")
    pytest.skip(f"{problem} (with CI=true this is an error)")


def venv_env(venv: Path) -> dict[str, str]:
    """The environment of a shell that activated ``venv`` and nothing of this one."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    }
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with ``sessionflow[redis]`` from the built wheel, the rest from the index.

    Only the ``redis`` extra: what a user of the Quick start gets, without the test extra
    that fills the dev venv.
    """
    if os.name == "nt":
        pytest.skip("POSIX only (venv layout, process groups, signals)")
    require(index_unreachable())
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent, timeout=120)
    assert made.returncode == 0, f"python -m venv failed:\n{made.stdout}\n{made.stderr}"
    requirement = f"sessionflow[redis] @ {wheel.as_uri()}"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", requirement],
        cwd=venv.parent,
        env=venv_env(venv),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (
        f"pip install {requirement!r} failed:\n{done.stdout}\n{done.stderr}"
    )
    return venv


PROJ = """\
from celery import Celery

from sessionflow import SessionFlow, current_session

app = Celery("proj", broker={broker!r}, backend={broker!r})
app.conf.update(
    task_default_queue={prefix!r} + ".default",
    result_expires=600,
    broker_connection_retry_on_startup=True,
    sessionflow_queue_prefix={prefix!r},
    sessionflow_database_url={database!r},
)
flow = SessionFlow(app)


@app.task
def add(x, y):
    return x + y


@app.task
def where():
    session = current_session()
    return session.id if session else None
"""

CLIENT = """\
import json

from proj import add, flow, where

plain = add.delay(2, 3).get(timeout=60)
with flow.create_session(creation_timeout=60, execution_timeout=120) as s:
    ran_in = s.apply_async(where).get(timeout=60)
    session_id = s.id
print(json.dumps({"plain": plain, "session": session_id, "ran_in": ran_in}))
"""


def stop(worker: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Warm shutdown (SIGTERM); SIGKILL the worker and its pool if that takes too long."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)


def wait_ready(worker: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while "ready." not in log.read_text(errors="replace"):
        if worker.poll() is not None:
            pytest.fail(
                f"the worker exited with {worker.returncode} before it was ready:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"the worker was not ready after {timeout} s:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.2)


def forget(prefix: str) -> None:
    """Delete this test's queues and bindings from its Redis database."""
    import redis

    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    try:
        for key in client.scan_iter(match=f"*{prefix}*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def redis_up() -> None:
    require(None if service_up("redis") else "Redis is not reachable on 127.0.0.1:6379")


def test_fresh_venv_redis_extra_runs_a_worker(
    fresh_venv: Path, redis_up: None, tmp_path: Path
) -> None:
    """``pip install "sessionflow[redis]"``, then ``celery -A proj worker`` serves a plain
    task and a session task (kombu's redis transport needs more than ``redis`` itself)."""
    run_id = uuid.uuid4().hex[:8]
    prefix = f"sfpkg-{run_id}"
    (tmp_path / "proj.py").write_text(
        PROJ.format(
            broker=f"{REDIS_URL}/{REDIS_DB}",
            prefix=prefix,
            database=f"sqlite:///{tmp_path / 'sessionflow.db'}",
        )
    )
    env = venv_env(fresh_venv)
    log = tmp_path / "worker.log"
    command = [
        str(fresh_venv / "bin" / "celery"),
        "-A",
        "proj",
        "worker",
        "-n",
        f"{prefix}@%h",
        "--max-sessions",
        "1",
        "-P",
        "prefork",
        "-c",
        "1",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    with log.open("wb") as out:
        worker = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(worker, log)
        client = subprocess.run(
            [str(fresh_venv / "bin" / "python"), "-c", CLIENT],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert client.returncode == 0, (
            f"client failed:\n{client.stdout}\n{client.stderr}\n"
            f"worker log:\n{log.read_text(errors='replace')[-4000:]}"
        )
        got = json.loads(client.stdout.strip().splitlines()[-1])
        assert got["plain"] == 5
        assert got["session"]
        assert got["ran_in"] == got["session"]
    finally:
        stop(worker)
        forget(prefix)


def test_fresh_venv_cli_version(fresh_venv: Path, tmp_path: Path) -> None:
    """``sessionflow --version`` prints the installed distribution's version."""
    env = venv_env(fresh_venv)
    expected = subprocess.run(
        [
            str(fresh_venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, sessionflow\n"
            "assert sessionflow.__version__ == m.version('sessionflow'), sessionflow.__version__\n"
            "print(m.version('sessionflow'))",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert expected.returncode == 0, expected.stderr
    version = expected.stdout.strip()
    done = subprocess.run(
        [str(fresh_venv / "bin" / "sessionflow"), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sessionflow {version}\n"

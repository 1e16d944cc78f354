"""Celery's own integration tests behave the same with ``SessionFlow(app)`` attached.

Runs tests/celery_suite/run_suite.py (a subset of Celery's ``t/integration``, once as
shipped and once attached, Redis databases 10 and 11) and checks what the queues of
embedded workers leave in Redis. Needs no stack fixture, only Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import service_up

pytestmark = pytest.mark.integration
SUITE = Path(__file__).resolve().parents[1] / "celery_suite"
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
EXIT_FETCH = 3  # run_suite.py: the sdist or the suite's requirements cannot be fetched


def _run(args: list[str], timeout: float) -> tuple[int, str]:
    """Run a helper script; on a timeout (or this test's) stop it: it stops its children."""
    process = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)
    return process.returncode, output


def _need_redis() -> None:
    if not service_up("redis"):
        if CI:
            pytest.fail("CI=true but Redis is not reachable on 127.0.0.1:6379")
        pytest.skip("Redis not running here (with CI=true this is an error)")


@pytest.mark.timeout(600)
def test_celery_suite_has_the_same_outcomes_with_sessionflow(tmp_path: Path) -> None:
    _need_redis()
    report = tmp_path / "report.json"
    status, output = _run([str(SUITE / "run_suite.py"), "--json", str(report)], timeout=570)
    if status == EXIT_FETCH and not CI:
        last = output.strip().splitlines()[-1]
        pytest.skip(f"cannot fetch Celery's sdist with pip (with CI=true this is an error): {last}")
    assert status == 0, output
    result = json.loads(report.read_text())
    shipped, attached = result["runs"][:2]
    assert (shipped["mode"], attached["mode"]) == ("shipped", "attached"), output
    for run in (shipped, attached):
        assert run["tests"] == result["selected"], output
        assert run["outcomes"].get("passed", 0) >= 0.75 * result["selected"], output
    assert attached["attach"]["workers"], output  # the extension really was attached
    assert result["keys_after"] and len(result["keys_after"]) <= len(result["keys_before"]), output


def _left_behind(store: Path, nodename: str | None = None) -> list[str]:
    """The binding keys one embedded worker's queues leave in Redis after it stops."""
    args = [str(SUITE / "queue_retention.py"), f"sqlite:///{store}"]
    # It may wait for run_suite.py's lock.
    status, output = _run(args + ([nodename] if nodename else []), timeout=420)
    assert status == 0, output
    found = json.loads(next(x for x in output.splitlines() if x.startswith('{"nodename"')))
    if nodename is None:
        assert found["nodename"].startswith("gen"), found  # Celery's generated name
    else:
        assert found["nodename"] == nodename, found
    left: list[str] = found["left"]
    return left


@pytest.mark.timeout(900)
def test_only_a_generated_node_name_deletes_its_queues_at_stop(tmp_path: Path) -> None:
    """Celery's embedded worker (``gen<pid>@host``) leaves no bindings; a named one keeps
    its queues, so a restarted worker with the same name finds its queued tasks."""
    _need_redis()
    assert _left_behind(tmp_path / "anonymous.db") == []
    left = _left_behind(tmp_path / "named.db", "suite-named@host")
    assert len(left) == 4, left  # binding table and permanent set of each of its 2 queues

"""The benchmark scripts still start against this package (they are not run by CI, so an
API change can break one unnoticed: bench_state.py did, after the store was rewritten)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=timeout
    )


def test_the_bench_folder_has_its_scripts() -> None:
    assert {"bench_sessions.py", "bench_state.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_script_imports_and_explains_its_options(script: str) -> None:
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_bench_state_runs_on_sqlite() -> None:
    """A tiny run, no server needed: every store call it makes still exists."""
    done = run("bench_state.py", "--store", "sqlite", "-n", "5", "--increments", "40")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"final count\s+40\s+\(exact\)", done.stdout), done.stdout

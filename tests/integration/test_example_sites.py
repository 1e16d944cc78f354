"""The web examples' own test suites, run as their users run them (``pytest`` in the
example's folder): real workers started by ``sessionflow.testing``, the Django admin in
headless chromium. Once on the embedded default, once on Redis + PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import service_up

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ARTIFACTS = ROOT / "test-artifacts"  # screenshots; .gitignore'd, kept after the run
VARIANTS = {
    "sqlite-embedded": ((), {"DJSITE_DB": "sqlite", "DJSITE_TEST_BROKER": "embedded"}),
    "postgres-redis": (
        ("redis", "postgres"),
        {
            "DJSITE_DB": "postgres",
            "DJSITE_TEST_BROKER": "app",
            "DJSITE_BROKER_URL": "redis://127.0.0.1:6379/14",
            "DJSITE_RESULT_BACKEND": "redis://127.0.0.1:6379/15",
        },
    ),
}


def _variants() -> list[object]:
    params: list[object] = []
    for name, (services, _) in VARIANTS.items():
        missing = [s for s in services if not service_up(s)]
        marks = []
        if missing and not CI:
            marks = [pytest.mark.skip(reason=f"{', '.join(missing)} not running here")]
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def run_suite(folder: Path, env: dict[str, str], name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{folder.name} ({name}) failed:\n{output[-6000:]}"
    return output


@pytest.mark.parametrize("variant", _variants())
def test_django_site_suite(variant: str, tmp_path: Path) -> None:
    services, extra = VARIANTS[variant]
    missing = [s for s in services if not service_up(s)]
    assert not missing, f"CI=true but {', '.join(missing)} is not reachable"
    shots = ARTIFACTS / f"django-{variant}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DJSITE_")},
        **extra,
        "DJSITE_DATA": str(tmp_path),
        "DJSITE_ARTIFACTS": str(shots),
        "DJSITE_PG_NAME": f"djsite_{os.getpid()}",
    }
    output = run_suite(ROOT / "examples" / "django_site", env, variant)
    assert "PASSED tests/test_reports.py::test_post_answers_202" in output, output[-3000:]
    assert "PASSED tests/test_reports.py::test_a_rollback_in_the_view_sends_nothing" in output
    if CI:  # the browser test ran (chromium is installed by .ci/run) and left its screenshots
        assert "PASSED tests/test_admin_browser.py" in output, output[-3000:]
        assert {p.name for p in shots.glob("*.png")} >= {
            "django-admin-sessions.png",
            "django-admin-session.png",
            "django-admin-completed.png",
        }


def test_flask_app_suite(tmp_path: Path) -> None:
    """The Flask example: 202 + poll, on-commit dispatch, `flask sessionflow`, and
    Flask-Migrate autogenerate next to the store's tables (embedded broker)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLASK_")},
        "FLASK_REPORTS_DATA": str(tmp_path),
    }
    output = run_suite(ROOT / "examples" / "flask_app", env, "embedded")
    for test in (
        "test_reports.py::",
        "test_on_commit.py::",
        "test_migrations.py::test_autogenerate",
    ):
        assert f"PASSED tests/{test}" in output, output[-3000:]
    assert " failed" not in output and " skipped" not in output, output[-3000:]

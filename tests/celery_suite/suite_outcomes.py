"""pytest plugin: append one JSON line per finished test to ``$SF_SUITE_OUTCOMES``.

Loaded in both modes; it only observes. A line is written as soon as a test's
teardown ends, so a run that is killed half-way still reports what it finished.
Outcomes: passed, failed, error (setup or teardown failed), skipped, xfailed, xpassed.
"""

from __future__ import annotations

import json
import os
from typing import IO

import pytest

OUTCOMES_ENV = "SF_SUITE_OUTCOMES"

_reports: dict[str, list[pytest.TestReport]] = {}
_out: IO[str] | None = None


def outcome_of(reports: list[pytest.TestReport]) -> str:
    """One outcome for a test's setup, call (and subtest) and teardown reports."""
    for when in ("setup", "call", "teardown"):
        phase = [r for r in reports if r.when == when]
        if any(r.failed for r in phase):
            return "failed" if when == "call" else "error"
        for report in phase:
            if hasattr(report, "wasxfail"):
                return "xfailed" if report.skipped else "xpassed"
            if report.skipped:
                return "skipped"
    return "passed"


def detail_of(reports: list[pytest.TestReport]) -> str:
    """The first failure's one-line crash message, e.g. ``TypeError: ...``."""
    for report in reports:
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            return f"{report.when}: {message.strip()[:500]}"
    return ""


def pytest_configure(config: pytest.Config) -> None:
    global _out
    path = os.environ.get(OUTCOMES_ENV)
    if path:
        _out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _reports.setdefault(report.nodeid, []).append(report)
    if report.when == "teardown" and _out is not None:
        reports = _reports.pop(report.nodeid)
        line = {
            "nodeid": report.nodeid,
            "outcome": outcome_of(reports),
            "detail": detail_of(reports),
        }
        _out.write(json.dumps(line) + "\n")
        _out.flush()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _out
    if _out is not None:
        _out.close()
        _out = None

"""The app's system checks: a misspelled key, a database that cannot hold the store."""

from __future__ import annotations

import warnings
from typing import Any

from sessionflow.contrib.django.checks import check_settings


def test_the_project_passes_its_checks() -> None:
    assert check_settings() == []


def test_a_misspelled_key_is_named_with_a_suggestion(settings: Any) -> None:
    settings.SESSIONFLOW = {**settings.SESSIONFLOW, "MAX_CONCURENT_SESSIONS": 4}
    errors = check_settings()
    assert [e.id for e in errors] == ["sessionflow.E001"]
    assert 'SESSIONFLOW["MAX_CONCURENT_SESSIONS"]' in errors[0].msg
    assert "MAX_CONCURRENT_SESSIONS" in errors[0].hint


def test_a_mysql_database_is_refused_with_the_reason(settings: Any) -> None:
    legacy = {"ENGINE": "django.db.backends.mysql", "NAME": "shop", "HOST": "127.0.0.1"}
    with warnings.catch_warnings():  # Django warns that DATABASES is read at start-up
        warnings.simplefilter("ignore", UserWarning)
        settings.DATABASES = {**settings.DATABASES, "legacy": legacy}
    settings.SESSIONFLOW = {**settings.SESSIONFLOW, "DATABASE": "legacy"}
    errors = check_settings()
    assert [e.id for e in errors] == ["sessionflow.E002"]
    assert "MySQL" in errors[0].msg or "mysql" in errors[0].msg.lower()

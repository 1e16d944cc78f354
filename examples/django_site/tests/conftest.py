from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.fixture(scope="session")
def sessionflow_options(sessionflow_options: dict[str, Any]) -> dict[str, Any]:
    """The plugin's defaults (embedded broker, store in the test database); with
    DJSITE_TEST_BROKER=app the project's own broker (CELERY_BROKER_URL)."""
    return {**sessionflow_options, "broker": os.environ.get("DJSITE_TEST_BROKER", "embedded")}

"""The admin's sessions pages in a real headless browser (Debian's chromium and chromedriver),
as Django's own LiveServerTestCase + Selenium tests do. Screenshots are saved in
$DJSITE_ARTIFACTS (default: .artifacts/ next to this project)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ARTIFACTS = Path(os.environ.get("DJSITE_ARTIFACTS") or Path(__file__).parents[1] / ".artifacts")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(10)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(browser: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_admin_lists_filters_shows_and_completes_sessions(
    browser: Any,
    live_server: Any,
    admin_user: Any,
    client: Any,
    sessionflow_worker: Any,
    sessionflow_flow: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    created = client.post("/reports/", {"title": "quarterly"}).json()  # a session with history
    closed = sessionflow_flow.get_session(created["session_id"])
    wait_for(lambda: closed.info.state.value == "closed" and len(closed.history()) == 2)
    open_session = sessionflow_flow.create_session(
        creation_timeout=30, execution_timeout=300, user_id="bob", metadata={"purpose": "browser"}
    )
    try:
        browser.get(f"{live_server.url}/admin/login/?next=/admin/sessionflow/session/")
        browser.find_element(By.NAME, "username").send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys("password")
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()

        body = browser.find_element(By.ID, "changelist").text
        assert created["session_id"] in body and open_session.id in body
        filters = browser.find_element(By.ID, "changelist-filter").text
        assert "By state" in filters and "By worker" in filters and "By user" in filters
        screenshot(browser, "django-admin-sessions.png")

        browser.find_element(By.LINK_TEXT, created["session_id"]).click()
        page = browser.find_element(By.ID, "content").text
        assert "reports.tasks.gather" in page and "reports.tasks.render" in page
        assert "HISTORY" in page.upper() and sessionflow_worker.nodename in page
        screenshot(browser, "django-admin-session.png")

        browser.get(f"{live_server.url}/admin/sessionflow/session/?status__exact=open")
        browser.find_element(By.CSS_SELECTOR, f"input[value='{open_session.id}']").click()
        Select(browser.find_element(By.NAME, "action")).select_by_value("complete_sessions")
        browser.find_element(By.NAME, "index").click()
        assert (
            "1 session(s) completed." in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
        )
        assert open_session.info.state.value == "closed"
        screenshot(browser, "django-admin-completed.png")
    finally:
        open_session.complete()

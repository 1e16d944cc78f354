"""The "202 + poll" flow, the on-commit dispatch and its rollback, on a real worker."""

from __future__ import annotations

import json
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from reports.models import Report
from sessionflow import SessionNotFound

# The worker reads what the view wrote: tests must commit (not run inside a transaction).
pytestmark = pytest.mark.django_db(transaction=True)


def poll(client: Any, url: str, done: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"gave up polling {url}: {body}"
        time.sleep(0.1)


def test_post_answers_202_and_one_worker_builds_the_report(
    client: Any, sessionflow_worker: Any
) -> None:
    response = client.post("/reports/", {"title": "sales"})
    assert response.status_code == 202, response.content
    created = response.json()
    assert response["Location"] == created["url"]

    body = poll(
        client,
        created["url"],
        lambda b: b["status"] == "done" and b["session"]["state"] == "closed",
    )
    assert body["result"] == "SALES: 3 ROWS"  # step 2 read the file step 1 left on that disk
    assert body["worker"] == sessionflow_worker.nodename
    assert body["session"] == {
        "id": created["session_id"],
        "state": "closed",  # complete_when_done: the session ended with its chain
        "worker": sessionflow_worker.nodename,
        "reason": "completed",
    }


def test_a_rollback_in_the_view_sends_nothing(
    client: Any, sessionflow_worker: Any, sessionflow_flow: Any
) -> None:
    response = client.post("/reports/", {"title": ""})
    assert response.status_code == 400
    session_id = response.json()["session_id"]
    assert not Report.objects.exists()
    time.sleep(1)  # time enough for a request that had been sent to be admitted
    with pytest.raises(SessionNotFound):
        sessionflow_flow.get_session(session_id)
    assert session_id not in [s.id for s in sessionflow_flow.list_sessions()]


def test_manage_py_sessionflow_shows_the_sessions(client: Any, sessionflow_worker: Any) -> None:
    created = client.post("/reports/", {"title": "stock"}).json()
    poll(client, created["url"], lambda b: b["session"]["state"] == "closed")
    out = StringIO()
    call_command("sessionflow", "show", created["session_id"], "--json", stdout=out)
    shown = json.loads(out.getvalue())
    assert shown["session"]["user_id"] == "anonymous"
    assert shown["session"]["metadata"] == {"report": created["id"]}
    assert sorted(t["name"] for t in shown["tasks"]) == [
        "reports.tasks.gather",
        "reports.tasks.render",
    ]


def test_the_worker_can_be_killed_and_comes_back(
    sessionflow_worker: Any, sessionflow_flow: Any
) -> None:
    session = sessionflow_flow.create_session(
        creation_timeout=30, execution_timeout=60, heartbeat_timeout=2
    )
    sessionflow_worker.kill()
    deadline = time.monotonic() + 15
    while session.info.state.value != "failed":
        assert time.monotonic() < deadline, session.info
        time.sleep(0.2)
    assert session.info.reason == "worker_lost"
    sessionflow_worker.start()
    with sessionflow_flow.create_session(creation_timeout=30, execution_timeout=60) as again:
        assert again.info.hostname == sessionflow_worker.nodename

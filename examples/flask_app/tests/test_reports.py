"""The "202 + poll" flow, the on-commit dispatch and its rollback, on a real worker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flaskapp.extensions import db
from flaskapp.models import Report
from sessionflow import SessionNotFound


def poll(client: FlaskClient, url: str, done: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).get_json()
        if done(body):
            return body  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"gave up polling {url}: {body}"
        time.sleep(0.1)


def test_post_answers_202_and_one_worker_builds_the_report(
    client: FlaskClient, sessionflow_worker: Any
) -> None:
    response = client.post("/reports", data={"title": "sales"})
    assert response.status_code == 202, response.data
    created = response.get_json()
    assert response.headers["Location"] == created["url"] == f"/reports/{created['id']}"

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


def test_post_does_not_wait_for_a_worker(client: FlaskClient, sessionflow_worker: Any) -> None:
    sessionflow_worker.stop()
    response = client.post("/reports", data={"title": "late"})
    assert response.status_code == 202, response.data
    url = response.get_json()["url"]
    body = client.get(url).get_json()
    assert (body["status"], body["session"]["state"]) == ("queued", "pending")

    sessionflow_worker.start()  # the request waited in the broker for a worker
    body = poll(client, url, lambda b: b["session"]["state"] == "closed")
    assert (body["status"], body["result"]) == ("done", "LATE: 3 ROWS")


def test_a_rollback_in_the_view_sends_nothing(
    flask_app: Flask, client: FlaskClient, sessionflow_worker: Any, sessionflow_flow: Any
) -> None:
    before = {s.id for s in sessionflow_flow.list_sessions()}
    response = client.post("/reports", data={"title": " "})
    assert response.status_code == 400
    with flask_app.app_context():
        assert db.session.query(Report).filter_by(title="untitled").count() == 0
    time.sleep(1)  # time enough for a request that had been sent to be admitted
    assert {s.id for s in sessionflow_flow.list_sessions()} == before


def test_unknown_report_is_404(client: FlaskClient, flask_app: Flask) -> None:
    assert client.get("/reports/999999").status_code == 404


def test_flask_sessionflow_shows_the_session(
    flask_app: Flask, client: FlaskClient, sessionflow_worker: Any, sessionflow_flow: Any
) -> None:
    created = client.post("/reports", data={"title": "stock"}).get_json()
    poll(client, created["url"], lambda b: b["session"]["state"] == "closed")
    result = flask_app.test_cli_runner().invoke(
        args=["sessionflow", "show", created["session_id"], "--json"]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["session"]["user_id"] == "anonymous"
    assert shown["session"]["metadata"] == {"report": created["id"]}
    assert sorted(t["name"] for t in shown["tasks"]) == [
        "flaskapp.tasks.gather",
        "flaskapp.tasks.render",
    ]
    with pytest.raises(SessionNotFound):
        sessionflow_flow.get_session("no-such-session")

"""Operating sessions with Celery's own tools, against real workers.

``celery -A sfapp sessions ...`` (every subcommand, human and ``--json``),
``celery inspect sessions`` / ``celery control sessions_cap``, Celery events read
by a real ``EventReceiver``, the signals, log lines, banner and Prometheus
metrics of a third worker ``w3`` that runs with ``-E`` and a metrics port.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from harness import DB_PASSWORD, Stack, WorkerProcess, wait_until
from sessionflow import SessionClosed, SessionCreationTimeout, SessionFlow, SessionState
from sessionflow.celery_cli import sessions as sessions_cli
from sessionflow.config import mask_url
from sessionflow.store.sql.migrate import head_revision

HEAD = head_revision()  # the revision a fresh store is at
pytestmark = pytest.mark.integration
GET = 30

# The app module of w3: the harness's app, a task that logs, and signal receivers that
# write what they hear (with the pid that heard it) to SF_SIGNAL_LOG.
OPSAPP = """
import json, os
from celery.utils.log import get_task_logger
from sfapp import create_app
from sessionflow import signals

app = create_app(os.environ)
app.conf.worker_task_log_format = (
    "[%(levelname)s/%(processName)s] %(task_name)s[%(task_id)s] session=%(session_id)s: %(message)s"
)
logger = get_task_logger("opsapp")


@app.task(name="opsapp.say", shared=False)
def say(text):
    logger.info("says %s", text)
    return text


def _recorder(name):
    def receive(sender=None, signal=None, **kwargs):
        with open(os.environ["SF_SIGNAL_LOG"], "a") as out:
            out.write(json.dumps({"signal": name, "sender": sender, "pid": os.getpid(), **kwargs}))
            out.write("\\n")
    return receive


for _name in signals.__all__:
    getattr(signals, _name).connect(_recorder(_name), weak=False)
"""


@dataclass
class Observed:
    """w3: a worker with task events, a metrics port and signal receivers."""

    worker: WorkerProcess
    signal_log: Path
    metrics_url: str

    @property
    def nodename(self) -> str:
        return self.worker.nodename

    def signals(self) -> list[dict[str, Any]]:
        if not self.signal_log.exists():
            return []
        return [json.loads(line) for line in self.signal_log.read_text().splitlines()]

    def scrape(self) -> dict[str, float]:
        """``/metrics`` parsed by prometheus_client's own parser: sample -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples


@pytest.fixture(scope="module")
def w3(stack: Stack) -> Iterator[Observed]:
    (stack.root / "opsapp.py").write_text(OPSAPP)
    signal_log = stack.root / "signals.jsonl"
    worker = stack.spawn_worker(
        "w3",
        max_sessions=2,
        extra=("-E", "--sessions-metrics-port", "0", "--sessions-metrics-addr", "127.0.0.1"),
        env={"SF_SIGNAL_LOG": str(signal_log)},
        app_module="opsapp",
    )
    stack.workers["w3"] = worker
    try:
        stack.wait_ready(worker)
        found = re.search(r"metrics of \S+ on (http://127\.0\.0\.1:\d+/metrics)", worker.log())
        assert found, worker.log()[-2000:]
        yield Observed(worker, signal_log, found.group(1))
    finally:
        for session in stack.flow.list_sessions(state="open", hostname=worker.nodename):
            session.complete()
        worker.stop()
        stack.workers.pop("w3", None)  # other modules count the stack's workers


def open_on(flow: SessionFlow, nodename: str, **options: Any) -> Any:
    """A new session on the worker ``nodename``: the others are filled meanwhile."""
    others = []
    try:
        for _ in range(12):
            s = flow.create_session(creation_timeout=20, execution_timeout=600, **options)
            if s.info.hostname == nodename:
                return s
            others.append(s)
        raise AssertionError(f"no session landed on {nodename}")
    finally:
        for s in others:
            s.complete()


def cli(stack: Stack, *args: str, app: Celery | None = None) -> Result:
    """``celery sessions ARGS`` in this process, with the stack's app as ``-A`` gives it."""
    obj = CLIContext(app=app or stack.app, no_color=True, workdir=None)
    result = CliRunner().invoke(sessions_cli, list(args), obj=obj)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def cli_json(stack: Stack, *args: str) -> Any:
    result = cli(stack, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def celery(stack: Stack, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The real ``celery -A sfapp ...`` command line, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "sfapp", *args],
        cwd=stack.root,
        env=stack.worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


SESSION_KEYS = {
    "session_id",
    "state",
    "reason",
    "moving",
    "hostname",
    "queue",
    "user_id",
    "agent_id",
    "metadata",
    "turns",
    "max_turns",
    "created_at",
    "opened_at",
    "closed_at",
    "deadline_at",
    "age",
    "last_heartbeat_at",
    "heartbeat_age",
    "requires",
    "constraints",
    "prefer",
    "placement",
}


# -- celery sessions, as a real celery subcommand -----------------------------------------


def test_celery_finds_the_sessions_command(stack: Stack, flow: SessionFlow) -> None:
    with flow.create_session(
        creation_timeout=GET, execution_timeout=600, user_id="entry-point"
    ) as s:
        done = celery(stack, "sessions", "list", "--user", "entry-point")
        assert done.returncode == 0, done.stderr
        header, row = done.stdout.splitlines()
        assert header.split() == [
            "SESSION",
            "STATE",
            "WORKER",
            "USER",
            "AGENT",
            "TURNS",
            "AGE",
            "REASON",
        ]
        assert row.split()[:4] == [s.id, "open", s.info.hostname, "entry-point"]
        assert header.index("WORKER") == row.index(s.info.hostname)  # aligned columns
    usage = celery(stack, "sessions", "list", "--state", "lost")
    assert usage.returncode == 2 and "'lost' is not one of" in usage.stderr
    missing = celery(stack, "sessions", "show", "no-such-session")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr.strip() == "Error: no session 'no-such-session' in the store"


# -- list ---------------------------------------------------------------------------------


def test_list_filters_newest_first_limit_and_json(stack: Stack, flow: SessionFlow) -> None:
    tag = f"lister-{time.monotonic_ns()}"
    first = flow.create_session(
        creation_timeout=GET, execution_timeout=600, user_id=tag, agent_id="a1"
    )
    second = flow.create_session(
        creation_timeout=GET, execution_timeout=600, user_id=tag, agent_id="a2"
    )
    third = flow.create_session(creation_timeout=GET, execution_timeout=600, user_id=tag)
    third.complete()

    data = cli_json(stack, "list", "--user", tag)
    assert set(data) == {"sessions", "limit", "more"}
    assert [s["session_id"] for s in data["sessions"]] == [third.id, second.id, first.id]
    assert set(data["sessions"][0]) == SESSION_KEYS
    assert data["sessions"][0]["state"] == "closed" and data["sessions"][0]["reason"] == "completed"
    assert data["more"] is False

    def ids(*args: str) -> list[str]:
        return [s["session_id"] for s in cli_json(stack, "list", "--user", tag, *args)["sessions"]]

    assert ids("--state", "open") == [second.id, first.id]
    assert ids("--state", "closed") == [third.id]
    assert ids("--state", "failed") == []
    assert ids("--agent", "a1") == [first.id]
    assert ids("--worker", first.info.hostname)[-1] == first.id
    assert ids("--newer-than", "1h") == [third.id, second.id, first.id]
    assert ids("--older-than", "1h") == []
    limited = cli_json(stack, "list", "--user", tag, "--limit", "1")
    assert [s["session_id"] for s in limited["sessions"]] == [third.id]
    assert limited["more"] is True

    table = cli(stack, "list", "--user", tag, "--limit", "2")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].startswith("SESSION") and lines[1].startswith(third.id)
    assert lines[-1] == "(the newest 2 shown; more match: raise --limit)"
    empty = cli(stack, "list", "--user", tag, "--older-than", "1d")
    assert (empty.exit_code, empty.stdout) == (0, "no sessions match\n")
    assert cli(stack, "list", "--newer-than", "soon").exit_code == 2
    first.complete()
    second.complete()


# -- show ---------------------------------------------------------------------------------


def test_show_info_tasks_history_and_state(stack: Stack, flow: SessionFlow) -> None:
    where, fail = stack.app.tasks["sfapp.where"], stack.app.tasks["sfapp.fail"]
    with flow.create_session(
        creation_timeout=GET, execution_timeout=600, user_id="shower", metadata={"job": 7}
    ) as s:
        ok = s.apply_async(where, args=(1,))
        ok.get(timeout=GET)
        bad = s.apply_async(fail)
        with pytest.raises(ValueError):
            bad.get(timeout=GET)
        s.state["greeting"] = "hello"
        s.state["user:plan"] = {"tier": "gold"}
        wait_until(lambda: len(s.history()) == 2, 10, "both runs in the history")

        data = cli_json(stack, "show", s.id)
        assert set(data) == {"session", "tasks", "history", "state"}
        assert set(data["session"]) == SESSION_KEYS
        assert data["session"]["metadata"] == {"job": 7}
        tasks = {t["task_id"]: t for t in data["tasks"]}
        assert set(tasks[ok.id]) == {
            "task_id",
            "name",
            "status",
            "worker",
            "dispatched_at",
            "started_at",
            "finished_at",
        }
        assert (tasks[ok.id]["status"], tasks[bad.id]["status"]) == ("succeeded", "failed")
        assert tasks[ok.id]["worker"] == s.info.hostname
        runs = {r["task_id"]: r for r in data["history"]}
        assert runs[bad.id]["state"] == "FAILURE" and "boom" in runs[bad.id]["error"]
        assert set(runs[ok.id]) == {
            "task_id",
            "name",
            "state",
            "worker",
            "started_at",
            "finished_at",
            "runtime",
            "error",
        }
        keys = {k["key"]: k for k in data["state"]}
        assert keys["greeting"] == {"key": "greeting", "scope": "session", "size": 7, "version": 1}
        assert keys["user:plan"]["scope"] == "user" and "value" not in keys["user:plan"]
        with_values = cli_json(stack, "show", s.id, "--values")
        assert {k["key"]: k["value"] for k in with_values["state"]} == {
            "greeting": "hello",
            "user:plan": {"tier": "gold"},
        }

        text = cli(stack, "show", s.id).stdout
        assert re.search(rf"^session +{s.id}$", text, re.M), text  # aligned labels
        assert re.search(r'^metadata +\{"job": 7\}$', text, re.M), text
        assert "2 tasks\nTASK" in text and "history: 2 runs\nTASK" in text
        assert "state: 2 keys\nKEY" in text and "hello" not in text
        assert "hello" in cli(stack, "show", s.id, "--values").stdout
    missing = cli(stack, "show", "nope")
    assert missing.exit_code == 1 and missing.stderr == "Error: no session 'nope' in the store\n"


# -- complete and fail -----------------------------------------------------------------------


def test_complete_and_fail_end_sessions_on_their_workers(stack: Stack, flow: SessionFlow) -> None:
    sleep, where = stack.app.tasks["sfapp.sleep"], stack.app.tasks["sfapp.where"]
    a = flow.create_session(creation_timeout=GET, execution_timeout=600)
    b = flow.create_session(creation_timeout=GET, execution_timeout=600)
    blocker = a.apply_async(sleep, args=(1.5,))
    queued = a.apply_async(where, args=("late",), countdown=3)  # not started when a ends
    wait_until(
        lambda: any(t.status.value == "started" for t in flow.store.tasks(a.id)),
        10,
        "the blocker to start",
    )

    done = cli(stack, "complete", a.id, "--json")
    assert done.exit_code == 0, done.output
    [result] = json.loads(done.stdout)
    assert result == {
        "session_id": a.id,
        "outcome": "ended",
        "state": "closed",
        "reason": "completed",
        "hostname": a.info.hostname,
    }
    assert blocker.get(timeout=GET) == 1.5  # running tasks finish
    with pytest.raises(SessionClosed):
        queued.get(timeout=GET)

    failed = cli(stack, "fail", b.id, "--reason", "stuck upload")
    assert failed.exit_code == 0, failed.output
    header, row = failed.stdout.splitlines()
    assert header.split() == ["SESSION", "RESULT", "STATE", "REASON", "WORKER"]
    assert row.split()[:3] == [b.id, "ended", "failed"] and "stuck upload" in row
    info = b.info
    assert (info.state, info.reason) == (SessionState.FAILED, "stuck upload")

    again = cli(stack, "complete", a.id, b.id)
    assert again.exit_code == 0 and again.stdout.count("had ended") == 2
    mixed = cli(stack, "complete", a.id, "no-such-session")
    assert mixed.exit_code == 1
    assert re.search(r"^no-such-session +not found", mixed.stdout, re.MULTILINE)
    assert mixed.stderr == "Error: 1 of 2 not ended: no-such-session (not found)\n"
    assert cli(stack, "fail", a.id).exit_code == 2  # --reason is required
    assert cli(stack, "complete").exit_code == 2


# -- workers ---------------------------------------------------------------------------------


def test_workers_store_and_live_side_by_side(stack: Stack, flow: SessionFlow) -> None:
    with flow.create_session(creation_timeout=GET, execution_timeout=600) as s:
        holder = s.info.hostname
        data = cli_json(stack, "workers")
        assert set(data) == {"workers", "answered", "timeout"}
        rows = {w["nodename"]: w for w in data["workers"]}
        for worker in stack.workers.values():
            row = rows[worker.nodename]
            assert set(row) == {"nodename", "store", "live", "live_error", "answered"}
            assert row["answered"] is True and worker.nodename in data["answered"]
            assert set(row["store"]) == {
                "status",
                "heartbeat_age",
                "cap",
                "open",
                "free",
                "pid",
                "host",
                "queue",
                "started_at",
                "resources",
                "used",
                "labels",
            }
            assert row["store"]["status"] == "online"
            assert row["store"]["pid"] == worker.popen.pid
            assert set(row["live"]) == {
                *("cap", "open", "free", "admission_paused", "sessions"),
                *("resources", "used", "labels", "task_limits"),
            }
            # w1, w2 declare no resources, labels or task limits (see test_placement.py)
            assert (row["store"]["resources"], row["store"]["labels"]) == ({}, {})
            assert (row["live"]["resources"], row["live"]["task_limits"]) == ({}, {})
            assert row["live"]["cap"] == row["store"]["cap"]
        assert s.id in rows[holder]["live"]["sessions"]
        assert rows[holder]["store"]["open"] >= 1

        text = cli(stack, "workers").stdout.splitlines()
        assert text[0].split()[:4] == ["WORKER", "STATUS", "HEARTBEAT", "PID"]
        line = next(x for x in text if x.startswith(holder))
        assert "online" in line and ("taking requests" in line or "paused" in line)

    # A worker the store knows that answers nothing (its process is gone).
    ghost = f"ghost-{time.monotonic_ns()}@nowhere"
    flow.store.register_worker(
        ghost,
        host="nowhere",
        pid=1,
        queue="q",
        max_sessions=3,
        is_alive=lambda *_: False,
    )
    flow.store.worker_offline(ghost)
    alone = cli(stack, "workers", "--worker", ghost, "--timeout", "0.5")
    assert alone.exit_code == 0
    lines = alone.stdout.splitlines()
    assert lines[1].split()[:2] == [ghost, "offline"]
    assert lines[1].split()[-3:] == ["answer", "-", "-"]  # ADMISSION; no RESOURCES, LABELS
    assert lines[-1].startswith("no worker answered `inspect sessions` within 0.5 s")
    shape = cli_json(stack, "workers", "--worker", ghost, "--timeout", "0.5")
    assert shape["answered"] == [] and shape["workers"][0]["live"] is None
    nobody = cli(stack, "workers", "--worker", "nobody@nowhere", "--timeout", "0.5")
    assert nobody.exit_code == 0 and nobody.stdout.startswith("no workers match\n")


# -- db --------------------------------------------------------------------------------------


def test_db_current_and_upgrade(stack: Stack, flow: SessionFlow) -> None:
    masked = mask_url(flow.config.database_url)
    current = cli(stack, "db", "current")
    assert current.exit_code == 0
    assert current.stdout == f"session store at {masked} is at revision {HEAD}\n"
    assert cli_json(stack, "db", "current") == {"url": masked, "revision": HEAD}
    upgrade = cli(stack, "db", "upgrade")
    assert upgrade.exit_code == 0 and upgrade.stdout.endswith(f"is at revision {HEAD}\n")

    bad = f"postgresql+psycopg://someone:{DB_PASSWORD}@127.0.0.1:1/nothing"
    failed = cli(stack, "db", "current", "--url", bad)
    assert failed.exit_code == 1 and DB_PASSWORD not in failed.output
    assert failed.stderr.startswith("Error: cannot reach the session store at ")
    assert "someone:***@127.0.0.1:1/nothing" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    mysql = cli(stack, "db", "upgrade", "--url", "mysql://root:x@127.0.0.1/db")
    assert mysql.exit_code == 1 and "MySQL/MariaDB cannot serve" in mysql.stderr

    default_store = Path("sessionflow.db").resolve()
    existed = default_store.exists()
    bare = Celery("bare", broker=stack.app.conf.broker_url, set_as_current=False)
    try:
        unnamed = cli(stack, "db", "upgrade", app=bare)
        assert unnamed.exit_code == 2
        assert "sqlite:///sessionflow.db" in unnamed.stderr and "--url" in unnamed.stderr
        listing = cli(stack, "list", app=bare)
        assert listing.exit_code == 2 and "SessionFlow(app)" in listing.stderr
    finally:
        bare.close()
    assert default_store.exists() == existed  # no implicit SQLite file


# -- inspect and control -------------------------------------------------------------------


def test_inspect_sessions_and_control_cap(stack: Stack, flow: SessionFlow, w3: Observed) -> None:
    s = open_on(flow, w3.nodename, user_id="inspected")
    try:
        where = stack.app.tasks["sfapp.where"]
        s.apply_async(where, args=(1,)).get(timeout=GET)
        done = celery(stack, "inspect", "sessions", "-d", w3.nodename, "--json")
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)[w3.nodename]
        assert set(view) == {
            *("nodename", "cap", "open", "free", "admission_paused", "sessions"),
            *("resources", "used", "labels", "task_limits"),
        }
        assert (view["cap"], view["open"], view["free"], view["admission_paused"]) == (
            2,
            1,
            1,
            False,
        )
        live = view["sessions"][s.id]
        assert live["tasks"] == 1 and live["user_id"] == "inspected" and live["age"] > 0

        lowered = celery(stack, "control", "sessions_cap", "1", "-d", w3.nodename)
        assert lowered.returncode == 0, lowered.stderr
        assert f"{w3.nodename}: OK" in lowered.stdout and "cap 2 -> 1 (1 open)" in lowered.stdout
        # The next request for w3 is judged by the new cap: w3 is full now.
        token = s.info.recreate_token
        with pytest.raises(SessionCreationTimeout):
            flow.recreate_session(token, creation_timeout=1.5, execution_timeout=60)
        raised = celery(stack, "control", "sessions_cap", "3", "-d", w3.nodename, "--json")
        assert raised.returncode == 0
        assert json.loads(raised.stdout) == [
            {w3.nodename: {"ok": "cap 1 -> 3 (1 open)", "old": 1, "new": 3, "open": 1}}
        ]
        second = flow.recreate_session(token, creation_timeout=GET, execution_timeout=60)
        assert second.info.hostname == w3.nodename
        second.complete()
    finally:
        s.complete()
        flow.app.control.broadcast(
            "sessions_cap", arguments={"cap": 2}, destination=[w3.nodename], reply=True
        )
    refused = celery(stack, "control", "sessions_cap", "0", "-d", w3.nodename)
    assert refused.returncode == 2 and "cap must be a whole number" in refused.stderr
    nobody = celery(stack, "inspect", "sessions", "-d", "nobody@nowhere")
    assert nobody.returncode == 69 and "No nodes replied" in nobody.stderr


# -- events, signals, logs, banner, metrics (w3) ---------------------------------------------


@contextmanager
def events(app: Celery, nodename: str) -> Iterator[list[dict[str, Any]]]:
    """Celery events seen by a real EventReceiver while the block runs."""
    got: list[dict[str, Any]] = []
    receivers: list[Any] = []

    errors: list[BaseException] = []

    def capture() -> None:
        try:
            with app.connection_for_read() as conn:
                receiver = app.events.Receiver(conn, handlers={"*": got.append})
                receivers.append(receiver)
                receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception as exc:  # reported by the test, not as a stray thread error
            errors.append(exc)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    try:
        # Ask w3 for a heartbeat event until one arrives: then the receiver listens (on
        # Redis it subscribes on its first read, so a single early request can be lost).
        def heard() -> bool:
            if any(e.get("hostname") == nodename for e in list(got)):
                return True
            app.control.broadcast("heartbeat", destination=[nodename])
            return False

        wait_until(heard, 30, "the event receiver to hear w3", interval=0.5)
        yield got
        time.sleep(1.0)  # events still on their way
    finally:
        if receivers:
            receivers[0].should_stop = True
        thread.join(10)
    assert not errors, errors


def test_events_carry_sessions_and_flower_sees_the_session_id(
    stack: Stack, flow: SessionFlow, w3: Observed
) -> None:
    where = stack.app.tasks["sfapp.where"]
    with events(stack.app, w3.nodename) as got:
        s = open_on(flow, w3.nodename, user_id="evt-user", agent_id="evt-agent")
        task_id = s.apply_async(where, args=(1,)).id
        stack.app.AsyncResult(task_id).get(timeout=GET)
        s.complete()
        t = open_on(flow, w3.nodename)
        assert cli(stack, "fail", t.id, "--reason", "operator").exit_code == 0
    mine = [e for e in got if e.get("hostname") == w3.nodename]
    opened = [e for e in mine if e["type"] == "session-opened" and e["session_id"] == s.id]
    closed = [e for e in mine if e["type"] == "session-closed" and e["session_id"] == s.id]
    failed = [e for e in mine if e["type"] == "session-failed" and e["session_id"] == t.id]
    assert len(opened) == len(closed) == len(failed) == 1, [e["type"] for e in mine]
    assert {k: opened[0][k] for k in ("user_id", "agent_id", "reason", "cap")} == {
        "user_id": "evt-user",
        "agent_id": "evt-agent",
        "reason": None,
        "cap": 2,
    }
    assert opened[0]["open"] >= 1
    assert (closed[0]["reason"], closed[0]["user_id"]) == ("completed", "evt-user")
    assert closed[0]["open"] == opened[0]["open"] - 1
    assert failed[0]["reason"] == "operator"

    task_events = [e for e in mine if e["type"].startswith("task-") and e["uuid"] == task_id]
    assert {e["type"] for e in task_events} >= {"task-received", "task-started", "task-succeeded"}
    assert {e.get("session_id") for e in task_events} == {s.id}
    # Flower keeps events in celery.events.state.State; its task page lists dir(task).
    state = stack.app.events.State()
    for event in got:
        state.event(dict(event))
    task = state.tasks[task_id]
    assert task.session_id == s.id and "session_id" in dir(task)


def test_signals_fire_in_the_worker_main_process(
    stack: Stack, flow: SessionFlow, w3: Observed
) -> None:
    s = open_on(flow, w3.nodename, user_id="sig-user")
    token = s.info.recreate_token
    full = flow.recreate_session(token, creation_timeout=GET, execution_timeout=60)  # 2 of 2
    wait_until(
        lambda: any(x["signal"] == "session_admission_paused" for x in w3.signals()),
        10,
        "admission to pause at the cap",
    )
    full.complete()
    wait_until(
        lambda: any(x["signal"] == "session_admission_resumed" for x in w3.signals()),
        10,
        "admission to resume",
    )
    s.complete()
    heard = w3.signals()
    assert {x["pid"] for x in heard} == {w3.worker.popen.pid}  # the main process
    assert {x["sender"] for x in heard} == {w3.nodename}
    by_session = [x for x in heard if x.get("session_id") == s.id]
    assert [x["signal"] for x in by_session] == ["session_opened", "session_closed"]
    assert by_session[0] == {
        "signal": "session_opened",
        "sender": w3.nodename,
        "pid": w3.worker.popen.pid,
        "session_id": s.id,
        "hostname": w3.nodename,
        "reason": None,
        "user_id": "sig-user",
        "agent_id": None,
        "open": by_session[0]["open"],
        "cap": 2,
    }
    assert by_session[1]["reason"] == "completed"
    paused = [x for x in heard if x["signal"] == "session_admission_paused"]
    assert {"open": 2, "cap": 2} in [{"open": x["open"], "cap": x["cap"]} for x in paused]


def test_log_lines_and_banner_name_the_session(
    stack: Stack, flow: SessionFlow, w3: Observed
) -> None:
    with open_on(flow, w3.nodename) as s:
        said = s.send_task("opsapp.say", args=("hello",))
        said.get(timeout=GET)
    wait_until(lambda: "says hello" in w3.worker.log(), 10, "the task's log line")
    assert f"opsapp.say[{said.id}] session={s.id}: says hello" in w3.worker.log()
    banner = w3.worker.log().split("[sessionflow]", 1)[1].split("\n\n", 1)[0]
    config = flow.config
    assert f".> session queue:   {config.worker_queue(w3.nodename)}" in banner
    assert (
        f".> creation queues: {config.creation_queue}, "
        f"{config.worker_creation_queue(w3.nodename)}" in banner
    )
    assert ".> max sessions:    2" in banner
    assert f".> store:           {config.masked_url}" in banner
    assert DB_PASSWORD not in w3.worker.log()


def test_prometheus_metrics_of_the_worker(stack: Stack, flow: SessionFlow, w3: Observed) -> None:
    where, fail = stack.app.tasks["sfapp.where"], stack.app.tasks["sfapp.fail"]
    node = f"hostname={w3.nodename}"
    runs = "sessionflow_session_task_runs_total{" + node + ",state=%s}"
    ended = "sessionflow_sessions_ended_total{" + node + ",reason=completed,state=closed}"
    before = w3.scrape()

    def grown(name: str, by: float) -> dict[str, float] | None:
        samples = w3.scrape()
        return samples if samples.get(name, 0.0) - before.get(name, 0.0) == by else None

    s = open_on(flow, w3.nodename)
    s.apply_async(where, args=(1,)).get(timeout=GET)
    with pytest.raises(ValueError):
        s.apply_async(fail).get(timeout=GET)
    late = s.apply_async(where, args=(2,), countdown=2)  # reaches the gate after the end
    wait_until(lambda: grown(runs % "SUCCESS", 1), 10, "the run to be counted")
    now = wait_until(lambda: grown(runs % "FAILURE", 1), 10, "the failed run to be counted")
    assert now[f"sessionflow_sessions_open{{{node}}}"] == 1
    assert now[f"sessionflow_sessions_cap{{{node}}}"] == 2
    assert now[f"sessionflow_admission_paused{{{node}}}"] == 0
    assert now[f"sessionflow_admission_wait_seconds_count{{{node}}}"] >= 1
    assert now[f"sessionflow_admission_wait_seconds_bucket{{{node},le=+Inf}}"] >= 1
    assert now[f"sessionflow_sessions_opened_total{{{node}}}"] >= 1
    s.complete()
    with pytest.raises(SessionClosed):
        late.get(timeout=GET)
    after = wait_until(lambda: grown(runs % "REFUSED", 1), 10, "the late task to be refused")
    assert after.get(ended, 0.0) - before.get(ended, 0.0) >= 1
    assert after[f"sessionflow_sessions_open{{{node}}}"] == 0


# -- prune (last: it deletes every session that has ended so far) -----------------------------


def test_prune_counts_then_deletes(stack: Stack, flow: SessionFlow) -> None:
    with flow.create_session(creation_timeout=GET, execution_timeout=600) as s:
        s.apply_async(stack.app.tasks["sfapp.where"], args=(1,)).get(timeout=GET)
        s.state["k"] = 1
    retained = cli(stack, "prune")  # sessionflow_retention: 7 days; all of these are newer
    assert retained.exit_code == 0
    assert re.fullmatch(
        r"no sessions ended before .* \(7d00h ago\): nothing to prune\n", retained.stdout
    )

    dry = cli_json(stack, "prune", "--older-than", "0s")
    assert set(dry) == {
        "deleted",
        "older_than",
        "ended_before",
        "sessions",
        "tasks",
        "runs",
        "state_keys",
    }
    assert dry["deleted"] is False and dry["sessions"] >= 1 and dry["state_keys"] >= 1
    text = cli(stack, "prune", "--older-than", "0s").stdout
    assert text.startswith("would delete ") and text.endswith(
        "run again with --yes to delete them\n"
    )
    assert s.info.state is SessionState.CLOSED  # nothing was deleted

    done = cli_json(stack, "prune", "--older-than", "0s", "--yes")
    assert done["deleted"] is True and done["sessions"] >= dry["sessions"]
    assert cli(stack, "show", s.id).exit_code == 1
    empty = cli(stack, "prune", "--older-than", "0s")
    assert empty.stdout.startswith("no sessions ended before ")


def test_no_secret_in_any_command_output(stack: Stack, flow: SessionFlow) -> None:
    outputs = [
        celery(stack, "sessions", "db", "current"),
        celery(stack, "sessions", "workers"),
        celery(stack, "inspect", "sessions"),
    ]
    for done in outputs:
        assert done.returncode == 0, done.stderr
        assert DB_PASSWORD not in done.stdout + done.stderr

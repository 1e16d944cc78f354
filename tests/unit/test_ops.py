"""The operator's commands without workers: ops functions, their tables and JSON, the
store they pick, and the worker-side pieces (hooks, signals, events, metrics, logs)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import URL
from store_contract.helpers import NODE, QUEUE, opened, put, run, send, write

from sessionflow import SessionFlow, signals
from sessionflow.celery_cli import duration, sessions, table
from sessionflow.celery_ext.control import parse_cap, sessions_cap
from sessionflow.celery_ext.control import sessions as inspect_sessions
from sessionflow.celery_ext.live import LiveSessions
from sessionflow.celery_ext.observe import Observer
from sessionflow.enums import SessionStatus
from sessionflow.errors import InvalidArgument
from sessionflow.events import TASK_FIELD, TaskEventTagger, task_events_on
from sessionflow.logs import banner_section, extend_banner, install_record_factory
from sessionflow.ops import (
    StoreNotConfigured,
    end_sessions,
    list_sessions,
    parse_duration,
    prune,
    show_session,
    store_config,
    workers,
)
from sessionflow.records import utcnow
from sessionflow.runtime import TaskRun, set_current_run
from sessionflow.store.sql.migrate import head_revision

HEAD = head_revision()  # the revision a fresh store is at


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    app = Celery("opstest", broker="memory://", set_as_current=False)
    app.conf.sessionflow_database_url = f"sqlite:///{tmp_path / 'ops.db'}"
    app.conf.sessionflow_secret_key = "ops-unit-test-secret-0123456789abcdef"
    yield app
    flow = SessionFlow.of(app)
    if flow is not None and "store" in flow.__dict__:
        flow.close()
    app.close()


@pytest.fixture
def flow(app: Celery) -> SessionFlow:
    return SessionFlow(app)


def cli(app: Celery, *args: str) -> Result:
    result = CliRunner().invoke(
        sessions, list(args), obj=CLIContext(app=app, no_color=True, workdir=None)
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# -- values and formatting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("1.5m", 90), ("2h", 7200), ("7d", 604800), ("1w", 604800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5s", "5 parsecs", "1e3"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument, match="not a duration"):
        parse_duration(text)


def test_table_aligns_columns_under_headers() -> None:
    text = table(["A", "LONG HEADER", "C"], [["xx", None, 3], ["y", "value", ""]])
    assert text.splitlines() == ["A   LONG HEADER  C", "xx  -            3", "y   value        -"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0.0071, "7ms"), (4.25, "4.2s"), (42.9, "42s"), (307, "5m07s"), (10920, "3h02m")],
)
def test_duration(seconds: float | None, shown: str) -> None:
    assert duration(seconds) == shown


# -- which store --------------------------------------------------------------------------------


def test_store_config_never_picks_the_default_implicitly(tmp_path: Path) -> None:
    with pytest.raises(StoreNotConfigured, match="No app was given"):
        store_config(None)
    bare = Celery("bare", set_as_current=False)
    with pytest.raises(StoreNotConfigured, match=r"sqlite:///sessionflow\.db") as err:
        store_config(bare)
    assert "--url" in str(err.value) and "'bare' sets none" in str(err.value)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert store_config(None, url).database_url == url
    assert store_config(bare, url).database_url == url


def test_a_url_object_setting_names_the_store_for_the_db_commands(tmp_path: Path) -> None:
    """load_config takes a sqlalchemy.URL; the db commands said "the app sets none"."""
    app = Celery("urlapp", broker="memory://", set_as_current=False)
    app.conf.sessionflow_database_url = URL.create("sqlite", database=str(tmp_path / "u.db"))
    app.conf.sessionflow_secret_key = "ops-unit-test-secret-0123456789abcdef"
    SessionFlow(app)
    try:
        upgraded = cli(app, "db", "upgrade")
        assert upgraded.exit_code == 0, upgraded.output
        assert (tmp_path / "u.db").exists()
    finally:
        SessionFlow.of(app).close()  # type: ignore[union-attr]
        app.close()


def test_reading_commands_never_create_a_store(app: Celery, tmp_path: Path) -> None:
    SessionFlow(app)
    for args in (["list"], ["db", "current"], ["workers"]):
        result = cli(app, *args)
        assert result.exit_code == 1, result.output
        assert "does not exist" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "ops.db").exists()
    created = cli(app, "db", "upgrade")
    assert created.exit_code == 0 and created.stdout.endswith(f"is at revision {HEAD}\n")
    assert cli(app, "db", "current", "--json").stdout == (
        json.dumps({"url": app.conf.sessionflow_database_url, "revision": HEAD}, indent=2) + "\n"
    )


def test_commands_need_an_app_with_sessionflow(tmp_path: Path) -> None:
    bare = Celery("bare", set_as_current=False)
    listing = cli(bare, "list")
    assert listing.exit_code == 2 and "SessionFlow(app)" in listing.stderr
    upgrade = cli(bare, "db", "upgrade")
    assert upgrade.exit_code == 2 and "which session store?" in upgrade.stderr
    assert cli(bare, "db", "upgrade", "--url", f"sqlite:///{tmp_path / 'y.db'}").exit_code == 0


# -- list, show, end, prune over a store ----------------------------------------------------


def test_list_newest_first_filters_and_limit(flow: SessionFlow) -> None:
    store = flow.store
    a = opened(store, user_id="u1", agent_id="x", created_at=utcnow() - timedelta(hours=2))
    b = opened(store, user_id="u1", created_at=utcnow() - timedelta(minutes=5))
    c = opened(store, user_id="u2", node="w2@host", queue="q2")
    store.end_session(c, SessionStatus.FAILED, "stuck")

    def ids(**filters: Any) -> list[str]:
        return [s["session_id"] for s in list_sessions(flow, **filters)["sessions"]]

    assert ids() == [c, b, a]
    assert ids(state="open") == [b, a] and ids(state="failed") == [c]
    assert ids(user_id="u1") == [b, a] and ids(agent_id="x") == [a]
    assert ids(hostname="w2@host") == [c] and ids(hostname=NODE) == [b, a]
    assert ids(older_than=3600) == [a] and ids(newer_than=3600) == [c, b]
    limited = list_sessions(flow, limit=2)
    assert (len(limited["sessions"]), limited["more"]) == (2, True)
    assert list_sessions(flow, limit=3)["more"] is False
    with pytest.raises(InvalidArgument):
        list_sessions(flow, state="lost")
    failed = list_sessions(flow, state="failed")["sessions"][0]
    assert (failed["state"], failed["reason"], failed["hostname"]) == ("failed", "stuck", "w2@host")
    assert "recreate_token" not in failed

    text = cli(flow.app, "list").stdout.splitlines()
    assert text[0].split() == [
        "SESSION",
        "STATE",
        "WORKER",
        "USER",
        "AGENT",
        "TURNS",
        "AGE",
        "REASON",
    ]
    assert [line.split()[0] for line in text[1:]] == [c, b, a]
    assert cli(flow.app, "list", "--user", "nobody").stdout == "no sessions match\n"


def test_show_tasks_runs_and_state(flow: SessionFlow) -> None:
    store = flow.store
    sid = opened(store, user_id="u1", metadata={"m": 1})
    send(store, sid, "t1", "t2")
    store.record_runs([run(sid, "t1", "SUCCESS"), run(sid, "t2", "FAILURE", error="E: x")])
    put(store, sid, "k", {"a": "é"})
    store.state_write(sid, [write("user", "u1", "user:pref", [1, 2])], 1 << 20)

    data = show_session(flow, sid)
    assert data["session"]["metadata"] == {"m": 1}
    assert [(t["task_id"], t["status"]) for t in data["tasks"]] == [
        ("t1", "succeeded"),
        ("t2", "failed"),
    ]
    assert [(r["task_id"], r["state"], r["runtime"]) for r in data["history"]] == [
        ("t1", "SUCCESS", 1.0),
        ("t2", "FAILURE", 1.0),
    ]
    assert data["state"] == [
        {"key": "k", "scope": "session", "size": len('{"a":"é"}'.encode()), "version": 1},
        {"key": "user:pref", "scope": "user", "size": 5, "version": 1},
    ]
    assert [k["value"] for k in show_session(flow, sid, values=True)["state"]] == [
        {"a": "é"},
        [1, 2],
    ]
    assert len(show_session(flow, sid, history=1)["history"]) == 1
    text = cli(flow.app, "show", sid).stdout
    assert "2 tasks\nTASK" in text and "history: 2 runs" in text and "state: 2 keys" in text
    assert "E: x" in text
    missing = cli(flow.app, "show", "nope")
    assert (missing.exit_code, missing.stderr) == (1, "Error: no session 'nope' in the store\n")


def test_end_sessions_that_are_not_open(flow: SessionFlow) -> None:
    store = flow.store
    done = opened(store)
    store.end_session(done, SessionStatus.CLOSED, "completed")
    results = end_sessions(flow, [done, "missing"], SessionStatus.FAILED, "operator")
    assert [(r["outcome"], r["state"], r["reason"]) for r in results] == [
        ("already_ended", "closed", "completed"),
        ("not_found", None, None),
    ]
    with pytest.raises(InvalidArgument):
        end_sessions(flow, [done], SessionStatus.OPEN, "x")
    out = cli(flow.app, "fail", done, "missing", "--reason", "operator", "--json")
    assert out.exit_code == 1
    assert [r["outcome"] for r in json.loads(out.stdout)] == ["already_ended", "not_found"]
    assert out.stderr == "Error: 1 of 2 not ended: missing (not found)\n"


def test_end_sessions_checks_every_id_before_ending_any(flow: SessionFlow) -> None:
    first = opened(flow.store)
    with pytest.raises(InvalidArgument, match="session_id"):
        end_sessions(flow, [first, ""], SessionStatus.CLOSED, "operator")
    assert flow.store.get_session(first).status is SessionStatus.OPEN  # ended nothing
    out = cli(flow.app, "complete", first, "")
    assert out.exit_code != 0 and "session_id" in out.stderr
    assert flow.store.get_session(first).status is SessionStatus.OPEN


@pytest.mark.parametrize("command", [("list",), ("prune",)])
def test_an_age_beyond_any_date_is_a_usage_error(flow: SessionFlow, command: tuple[str]) -> None:
    opened(flow.store)  # the store exists
    out = cli(flow.app, *command, "--older-than", "99999999w")
    assert out.exit_code != 0 and "older_than" in out.stderr
    with pytest.raises(InvalidArgument, match="newer_than"):
        list_sessions(flow, newer_than=10.0**12)


def test_prune_counts_then_deletes(flow: SessionFlow) -> None:
    store = flow.store
    old = opened(store)
    send(store, old, "t1")
    put(store, old, "k", 1)
    store.end_session(old, SessionStatus.CLOSED, "completed")
    store.settle(old)
    opened(store)  # open: never pruned
    assert prune(flow)["sessions"] == 0  # retention: 7 days
    dry = prune(flow, older_than=0)
    assert {k: dry[k] for k in ("deleted", "sessions", "tasks", "state_keys")} == {
        "deleted": False,
        "sessions": 1,
        "tasks": 1,
        "state_keys": 1,
    }
    assert store.get_session(old) is not None
    assert cli(flow.app, "prune", "--older-than", "0").stdout.startswith(
        "would delete 1 session ended before "
    )
    assert prune(flow, older_than=0, apply=True)["sessions"] == 1
    assert store.get_session(old) is None
    flow.app.conf.sessionflow_retention = None
    flow.__dict__.pop("config")
    with pytest.raises(InvalidArgument, match="--older-than"):
        prune(flow)


# -- remote control --------------------------------------------------------------------------


def live_of(flow: SessionFlow, cap: int = 2) -> LiveSessions:
    return LiveSessions(NODE, QUEUE, cap, flow.store, flow.resolver, lambda: None)


def test_inspect_and_cap_commands(flow: SessionFlow) -> None:
    live = live_of(flow)
    flow.live = live
    state = SimpleNamespace(consumer=SimpleNamespace(app=flow.app))
    try:
        live.open(flow.store.get_session(opened(flow.store)))  # type: ignore[arg-type]
        view = inspect_sessions(state)
        assert (view["nodename"], view["cap"], view["open"], view["free"]) == (NODE, 2, 1, 1)
        assert view["admission_paused"] is False
        assert sessions_cap(state, "5") == {
            "ok": "cap 2 -> 5 (1 open)",
            "old": 2,
            "new": 5,
            "open": 1,
        }
        assert live.cap == 5 and live.has_room()
        assert "error" in sessions_cap(state, "0") and live.cap == 5
    finally:
        live.remove_dir()
        flow.live = None


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5", "08", True, 2_000_000])
def test_parse_cap_refuses(bad: Any) -> None:
    import click

    with pytest.raises(click.BadParameter):
        parse_cap(bad)


# -- worker side: hooks, signals, events, metrics, logs ---------------------------------------


def test_admission_hooks_hear_changes_not_the_start(flow: SessionFlow) -> None:
    live = live_of(flow)
    heard: list[bool] = []
    live.on_admission.append(heard.append)
    try:
        live.set_admission_paused(False)  # the first decision, at start
        live.set_admission_paused(False)
        live.set_admission_paused(True)
        live.set_admission_paused(True)
        live.set_admission_paused(False)
        assert heard == [True, False]
    finally:
        live.remove_dir()


class FakeWorker:
    """What Observer needs of a WorkController."""

    def __init__(self, flow: SessionFlow, live: LiveSessions) -> None:
        self.app = flow.app
        self.task_events = True
        self.consumer = None
        self.startup_info = lambda artlines=True: "celery banner\n"
        self.sessionflow = SimpleNamespace(
            live=live,
            nodename=NODE,
            queue=QUEUE,
            flow=flow,
            gate=SimpleNamespace(observers=[]),
        )


def test_observer_fans_out_to_signals_events_and_metrics(flow: SessionFlow) -> None:
    live = live_of(flow, cap=1)
    w = FakeWorker(flow, live)
    observer = Observer(w, sessions_metrics_port=0)
    sent: list[tuple[str, dict[str, Any]]] = []
    observer.events.send = lambda type_, **fields: sent.append((type_, fields))  # type: ignore[method-assign]
    heard: list[tuple[str, Any, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def receive(sender: Any = None, signal: Any = None, **kwargs: Any) -> None:
            heard.append((name, sender, kwargs))

        return receive

    receivers = {name: recorder(name) for name in signals.__all__}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver)
    try:
        sid = opened(flow.store, user_id="u", agent_id="a")
        live.set_admission_paused(False)
        live.open(flow.store.get_session(sid))  # type: ignore[arg-type]
        live.set_admission_paused(True)
        flow.store.end_session(sid, SessionStatus.FAILED, "operator")
        live.end(sid)
        live.set_admission_paused(False)
        w.sessionflow.gate.observers[0](sid, "SUCCESS")
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
        observer._on_shutdown()
        live.remove_dir()
    fields = {"session_id": sid, "user_id": "u", "agent_id": "a", "cap": 1}
    assert [(t, {k: f[k] for k in fields}) for t, f in sent] == [
        ("session-opened", fields),
        ("session-failed", fields),
    ]
    assert (sent[0][1]["open"], sent[1][1]["open"], sent[1][1]["reason"]) == (1, 0, "operator")
    assert [(name, sender) for name, sender, _ in heard] == [
        ("session_opened", NODE),
        ("session_admission_paused", NODE),
        ("session_failed", NODE),
        ("session_admission_resumed", NODE),
    ]
    assert heard[0][2] == {**fields, "hostname": NODE, "reason": None, "open": 1}
    assert heard[1][2] == {"hostname": NODE, "open": 1, "cap": 1}
    assert observer.metrics is not None
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(
            __import__("prometheus_client").generate_latest(observer.metrics.registry).decode()
        )
        for s in family.samples
    }
    host = ("hostname", NODE)
    assert samples[("sessionflow_sessions_opened_total", (host,))] == 1
    assert (
        samples[
            (
                "sessionflow_sessions_ended_total",
                (host, ("reason", "other"), ("state", "failed")),
            )
        ]
        == 1
    )
    assert samples[("sessionflow_session_task_runs_total", (host, ("state", "SUCCESS")))] == 1
    assert samples[("sessionflow_sessions_open", (host,))] == 0
    assert samples[("sessionflow_admission_wait_seconds_count", (host,))] == 1
    banner = w.startup_info(artlines=False)
    assert banner.startswith("celery banner\n\n[sessionflow]\n.> session queue:   ")
    assert ".> max sessions:    1\n" in banner


def test_task_events_get_the_session_id() -> None:
    dispatcher = SimpleNamespace(enabled=True, groups=set(), published=[])
    dispatcher._publish = lambda event, *a, **k: dispatcher.published.append(event)
    tagger = TaskEventTagger(lambda: dispatcher)
    assert tagger.wrap(dispatcher) and tagger.wrap(dispatcher)  # idempotent
    request = SimpleNamespace(id="t1", request_dict={"sessionflow_session": "s1"})
    tagger.on_task_received(request=request)
    tagger.on_task_received(request=SimpleNamespace(id="t2", request_dict={}))
    dispatcher._publish({"type": "task-received", "uuid": "t1"}, None, "task.received")
    dispatcher._publish(
        [
            {"type": "task-started", "uuid": "t1"},
            {"type": "task-succeeded", "uuid": "t1"},
            {"type": "task-succeeded", "uuid": "t2"},
            {"type": "worker-heartbeat"},
        ],
        None,
        "task.multi",
    )
    first, batch = dispatcher.published
    assert first[TASK_FIELD] == "s1"
    assert [e.get(TASK_FIELD) for e in batch] == ["s1", "s1", None, None]
    assert tagger.sessions == {}  # forgotten once it ended
    assert task_events_on(dispatcher) and not task_events_on(None)
    assert not task_events_on(SimpleNamespace(enabled=True, groups={"worker"}))
    assert not task_events_on(SimpleNamespace(enabled=False, groups=set()))


def test_log_records_name_the_session(caplog: pytest.LogCaptureFixture) -> None:
    install_record_factory()
    install_record_factory()  # idempotent
    logger = logging.getLogger("sessionflow.test")
    with caplog.at_level(logging.INFO, logger="sessionflow.test"):
        logger.info("outside")
        set_current_run(TaskRun("s-42", "t", "name", NODE, {}))
        try:
            logger.info("inside")
        finally:
            set_current_run(None)
    assert [(r.getMessage(), r.session_id) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("outside", ""),
        ("inside", "s-42"),
    ]
    formatted = logging.Formatter("%(session_id)s: %(message)s").format(caplog.records[1])
    assert formatted == "s-42: inside"


def test_banner_section_and_extend_banner() -> None:
    assert (
        banner_section([("a", "1"), ("longer", "2")])
        == "\n[sessionflow]\n.> a:      1\n.> longer: 2\n"
    )
    worker = SimpleNamespace(startup_info=lambda artlines=True: "X\n")
    extend_banner(worker, lambda: [("store", "sqlite://")])
    extend_banner(worker, lambda: [("twice", "no")])  # idempotent
    assert (
        worker.startup_info()
        == "X\n\n" + " " * 16 + "[sessionflow]\n" + " " * 16 + ".> store: sqlite://\n"
    )
    plain = SimpleNamespace()
    extend_banner(plain, lambda: [])  # an embedded test worker has no banner
    assert not hasattr(plain, "startup_info")


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e400", "soon"])
def test_workers_bad_timeout_is_a_usage_error(app: Celery, timeout: str) -> None:
    # 0 and nan gave exit 1 (an error of the command), unlike every other bad option.
    SessionFlow(app).store.upgrade()
    result = cli(app, "workers", "--timeout", timeout)
    assert result.exit_code == 2, result.output
    assert "--timeout" in result.stderr and "Traceback" not in result.output


def test_ops_workers_refuses_a_huge_timeout(flow: SessionFlow) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        workers(flow, timeout=10**400)  # math.isfinite raised OverflowError

"""canvas.py: building, walking and stamping signatures; the session router."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, Signature, chain, chord, group, signals
from celery.canvas import _chain, _chord
from celery.contrib.testing.worker import start_worker

from sessionflow import InvalidArgument
from sessionflow.canvas import (
    QUEUE_HEADER,
    SESSION_HEADER,
    SIG_HEADER,
    build_signature,
    leaves,
    nodes,
    route_session_task,
    stamp,
)
from sessionflow.tokens import sign_task, task_signed

QUEUE = "sfunit.worker.w1_host-0123abcd"
GET = 20
KEY = b"k" * 32


def signer(task_id: str) -> str:
    return sign_task(KEY, "s-1", task_id)


def make_app() -> Celery:
    app = Celery("canvas", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(
        task_routes=(route_session_task,),
        broker_transport_options={"polling_interval": 0.01},
        result_serializer="json",
    )

    @app.task(name="t.add", shared=False)
    def add(*values: Any) -> int:
        return sum(sum(v) if isinstance(v, list) else v for v in values)

    @app.task(name="t.elsewhere", shared=False, queue="some-other-queue")
    def elsewhere(*values: Any) -> str:
        return "ran"

    return app


@pytest.fixture(scope="module")
def app() -> Iterator[Celery]:
    app = make_app()
    yield app
    app.close()


def add(app: Celery) -> Any:
    return app.tasks["t.add"]


# -- build_signature --------------------------------------------------------


def test_build_from_task(app: Celery) -> None:
    sig = build_signature(add(app), [1, 2], {"x": 3}, {"countdown": 5})
    assert isinstance(sig, Signature)
    assert (sig.task, sig.args, sig.kwargs) == ("t.add", (1, 2), {"x": 3})
    assert sig.options["countdown"] == 5


def test_build_from_signature_prepends_args_and_copies(app: Celery) -> None:
    original = add(app).s(2)
    sig = build_signature(original, (1,), None, {"priority": 3})
    assert sig is not original
    assert (sig.args, sig.kwargs, sig.options["priority"]) == ((1, 2), {}, 3)
    assert (original.args, original.options) == ((2,), {})


@pytest.mark.parametrize(
    "shape",
    ["chain", "group", "chord", "nested"],
)
def test_build_from_canvas_keeps_type_and_leaves_original_alone(app: Celery, shape: str) -> None:
    a = add(app)
    canvases: dict[str, tuple[Signature, type]] = {
        "chain": (chain(a.s(1), a.s(2)), _chain),
        "group": (group(a.s(1), a.s(2)), group),
        "chord": (chord([a.s(1), a.s(2)], a.s()), _chord),
        "nested": (chain(a.s(1), group(a.s(2), chain(a.s(3), a.s(4))), a.s()), _chain),
    }
    original, kind = canvases[shape]
    before = dict(original)
    sig = build_signature(original, (), None, {})
    assert isinstance(sig, kind)
    assert sig is not original
    sig.freeze()
    stamp(sig, "s-1", QUEUE, signer)
    assert dict(original) == before  # the caller's canvas can be reused


@pytest.mark.parametrize("option", ["queue", "exchange", "routing_key", "exchange_type"])
def test_routing_options_rejected(app: Celery, option: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        build_signature(add(app), (), None, {option: "x", "countdown": 1})
    assert option in str(info.value)
    assert "session" in str(info.value)


@pytest.mark.parametrize("args", ["ab", {"a": 1}, None, 5, {1, 2}])
def test_bad_args(app: Celery, args: Any) -> None:
    with pytest.raises(InvalidArgument, match="args must be a list or tuple"):
        build_signature(add(app), args, None, {})


@pytest.mark.parametrize("kwargs", [[("a", 1)], "a=1", 5])
def test_bad_kwargs(app: Celery, kwargs: Any) -> None:
    with pytest.raises(InvalidArgument, match="kwargs must be a mapping"):
        build_signature(add(app), (), kwargs, {})


def test_kwargs_keys_must_be_strings(app: Celery) -> None:
    # {1: 2} raised TypeError ("keywords must be strings") from Celery at the call
    with pytest.raises(InvalidArgument, match="kwargs keys must be strings, got 1"):
        build_signature(add(app), (), {1: 2}, {})


@pytest.mark.parametrize("obj", ["t.add", None, 42, print, object()])
def test_not_a_task(obj: Any) -> None:
    with pytest.raises(InvalidArgument, match="expected a Celery task, signature or canvas"):
        build_signature(obj, (), None, {})


# -- stamp and the router ----------------------------------------------------


def test_stamp_sets_headers_on_every_node_and_clears_routes(app: Celery) -> None:
    a = add(app)
    sig = chain(
        a.s(1).set(queue="q1", headers={"mine": 1}),
        chord([a.s(2), group(a.s(3), a.s(4))], a.s().set(routing_key="rk")),
    )
    sig.freeze()
    stamp(sig, "s-1", QUEUE, signer)
    all_nodes = list(nodes(sig))
    assert len(all_nodes) >= 8
    task_ids = {leaf.id for leaf in leaves(sig)}
    for node in all_nodes:
        for key in ("queue", "exchange", "routing_key", "exchange_type"):
            assert node.options[key] is None
        if node.id not in task_ids or isinstance(node, (_chain, _chord, group)):
            # Celery merges a composite's headers over its members': it must have none.
            assert "headers" not in node.options
            continue
        headers = node.options["headers"]
        assert headers[SESSION_HEADER] == "s-1"
        assert headers[QUEUE_HEADER] == QUEUE
        assert headers[SIG_HEADER] == signer(node.id)
    first = sig.tasks[0]
    assert first.options["headers"]["mine"] == 1  # user headers kept


def test_stamp_moves_a_groups_own_headers_to_its_members(app: Celery) -> None:
    a = add(app)
    sig = group(a.s(1), a.s(2)).set(headers={"tenant": "t1"})
    sig.freeze()
    stamp(sig, "s-1", QUEUE, signer)
    assert "headers" not in sig.options
    for member in sig.tasks:
        assert member.options["headers"]["tenant"] == "t1"
        assert member.options["headers"][SIG_HEADER] == signer(member.id)


def test_router_ignores_non_session_messages() -> None:
    assert route_session_task("t.add", (), {}, {}) is None
    assert route_session_task("t.add", (), {}, {"headers": None}) is None
    assert route_session_task("t.add", (), {}, {"headers": {"other": "x"}}) is None
    assert route_session_task("t.add", (), {}, {"headers": {QUEUE_HEADER: ""}}) is None


def test_router_routes_session_messages() -> None:
    route = route_session_task("t.add", (), {}, {"headers": {QUEUE_HEADER: QUEUE}})
    assert route is not None
    assert route["routing_key"] == QUEUE
    assert route["queue"].name == QUEUE


def test_app_router_overrides_task_class_queue(app: Celery) -> None:
    sig = app.tasks["t.elsewhere"].s(1)
    sig.freeze()
    stamp(sig, "s-1", QUEUE, signer)
    task = app.tasks["t.elsewhere"]
    options = dict(task._get_exec_options(), **sig.options)
    routed = app.amqp.router.route(options, task.name, (1,), {}, task_type=task)
    assert routed["queue"].name == QUEUE
    assert routed["routing_key"] == QUEUE
    plain = app.amqp.router.route(dict(task._get_exec_options()), task.name, (), {}, task)
    assert plain["queue"].name == "some-other-queue"  # the class route without a session


# -- what actually gets published --------------------------------------------


class Published:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, str, str]] = []
        self.signed: list[bool] = []

    def __call__(self, sender: Any = None, headers: Any = None, **kw: Any) -> None:
        with self.lock:
            self.messages.append((headers["id"], kw.get("routing_key"), sender))
            self.signed.append(task_signed(KEY, "s-1", headers["id"], headers.get(SIG_HEADER)))

    def take(self) -> list[tuple[str, str, str]]:
        with self.lock:
            taken, self.messages = self.messages, []
        return taken


@pytest.fixture(scope="module")
def published(app: Celery) -> Iterator[Published]:
    recorder = Published()
    signals.before_task_publish.connect(recorder, weak=False)
    try:
        with start_worker(
            app,
            pool="solo",
            perform_ping_check=False,
            queues=[QUEUE],
            loglevel="WARNING",
            shutdown_timeout=10,
        ):
            yield recorder
    finally:
        signals.before_task_publish.disconnect(recorder)


def _canvases(app: Celery) -> dict[str, tuple[Signature, Any]]:
    a = add(app)
    e = app.tasks["t.elsewhere"]
    return {
        "task": (a.s(1, 2), 3),
        "class-queue": (e.s(1), "ran"),
        "chain": (chain(a.s(1), a.s(2), a.s(3)), 6),
        "group": (group(a.s(1), a.s(2), a.s(3)), [1, 2, 3]),
        "chord": (chord([a.s(1), a.s(2)], a.s()), 3),
        "chain-ending-in-group": (chain(a.s(1), a.s(2), group(a.s(3), a.s(4))), [6, 7]),
        "chord-inside-chain": (chain(a.s(1), chord([a.s(2), a.s(3)], a.s()), a.s(5)), 12),
        "group-then-task (implicit chord)": (chain(a.s(1), group(a.s(2), a.s(3)), a.s()), 7),
        "chord-with-nested-header": (
            chord([chain(a.s(1), a.s(2)), group(a.s(1), a.s(2))], a.s()),
            6,
        ),
        "group-of-chains": (group(chain(a.s(1), a.s(2)), chain(a.s(3), a.s(4))), [3, 7]),
    }


@pytest.mark.parametrize("shape", list(_canvases(make_app())))
def test_leaves_are_exactly_the_published_tasks(
    app: Celery, published: Published, shape: str
) -> None:
    original, expected = _canvases(app)[shape]
    sig = build_signature(original, (), None, {})
    sig.freeze()
    leaf_ids = [leaf.id for leaf in leaves(sig)]
    assert len(set(leaf_ids)) == len(leaf_ids)
    stamp(sig, "s-1", QUEUE, signer)
    published.take()
    published.signed.clear()
    result = sig.apply_async()
    assert result.get(timeout=GET, interval=0.01) == expected
    signed = list(published.signed)
    messages = published.take()
    assert len(signed) == len(messages) and all(signed)  # every message proves its session
    assert sorted(leaf_ids) == sorted(task_id for task_id, _, _ in messages)
    assert {routing_key for _, routing_key, _ in messages} == {QUEUE}

"""The embedded broker: complete message files, consumed in the order they were sent."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from kombu import Connection, Queue

from sessionflow import fsbroker


def test_messages_of_one_producer_are_consumed_in_order(tmp_path: Path) -> None:
    """Seen in CI: two long tasks and then a short one sent to a session within one
    millisecond; the short one ran first, because message files were named by the
    millisecond and then a random uuid, and kombu reads them in name order."""
    options = fsbroker.settings(tmp_path)["broker_transport_options"]
    queue = Queue("ordered")
    with Connection(transport=fsbroker.Transport, transport_options=options) as conn:
        with conn.Producer() as producer:
            for n in range(300):
                producer.publish({"n": n}, routing_key="ordered", declare=[queue])
        simple = conn.SimpleQueue(queue)
        got = []
        for _ in range(300):
            message = simple.get(timeout=5)
            got.append(message.payload["n"])
            message.ack()
        simple.close()
    assert got == list(range(300))


def test_message_names_keep_the_queue_where_kombu_looks_for_it() -> None:
    name = fsbroker.message_name("sessionflow.worker.w1")
    assert name.partition(".")[2] == "sessionflow.worker.w1.msg"
    later = fsbroker.message_name("sessionflow.worker.w1")
    assert later > name


def _bind_and_route(options: dict[str, Any], exchange: str, n: int, start: Any, out: Any) -> None:
    """One process: at ``start``, bind queue q<n> to ``exchange`` and look the table up."""
    try:
        with Connection(transport=fsbroker.Transport, transport_options=options) as conn:
            channel = conn.default_channel
            channel.exchange_declare(exchange, "direct")
            channel.queue_declare(f"q{n}")
            start.wait(10)
            channel.queue_bind(f"q{n}", exchange, f"q{n}")
            channel.get_table(exchange)
        out.put(None)
    except Exception as exc:  # reported to the test: a child's traceback is not enough
        out.put(f"{type(exc).__name__}: {exc}")


def test_processes_binding_to_one_exchange_at_once_lose_no_binding(tmp_path: Path) -> None:
    """Seen in CI: two workers starting together bound queues to one exchange; kombu
    creates its table file empty and fills it afterwards, so the other process read ''
    (JSONDecodeError, the worker exited) or wrote over it (a binding lost: messages to
    that queue were dropped, and sessions never created)."""
    options = fsbroker.settings(tmp_path)["broker_transport_options"]
    context = multiprocessing.get_context("fork")
    problems: list[str] = []
    for round_ in range(15):
        exchange = f"shared{round_}"
        start, out = context.Event(), context.Queue()
        procs = [
            context.Process(target=_bind_and_route, args=(options, exchange, n, start, out))
            for n in range(4)
        ]
        for proc in procs:
            proc.start()
        start.set()
        problems += [p for p in (out.get(timeout=30) for _ in procs) if p]
        for proc in procs:
            proc.join(30)
        with Connection(transport=fsbroker.Transport, transport_options=options) as conn:
            bound = {q.queue for q in conn.default_channel.get_table(exchange)}
        if bound != {f"q{n}" for n in range(4)}:
            problems.append(f"round {round_}: bindings {sorted(bound)}")
    assert problems == []

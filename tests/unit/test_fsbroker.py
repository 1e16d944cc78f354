"""The embedded broker: complete message files, consumed in the order they were sent."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

from celery import Celery, states
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


class _SlowFile:
    """A file whose write stops halfway until the test lets it go on."""

    def __init__(self, file: Any, halfway: threading.Event, go_on: threading.Event) -> None:
        self.file, self.halfway, self.go_on = file, halfway, go_on

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        self.halfway.set()
        self.go_on.wait(10)
        return self.file.write(data[len(data) // 2 :])

    def __enter__(self) -> _SlowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def read(backend: Any, task_id: str) -> Any:
    """The stored result as it is in the file now (the backend caches what it read)."""
    return backend.decode_result(backend.get(backend.get_key_for_task(task_id)))["result"]


def test_a_result_being_written_is_never_read_half_written(tmp_path: Path) -> None:
    # Celery's file:// backend writes a result straight into its file: a caller polling
    # read half a document (DecodeError), and two writers of one result (a session's end
    # and the pool refusing the task) left "Extra data" behind for good.
    app = Celery("fsresults", set_as_current=False)
    app.conf.result_backend = fsbroker.result_backend(tmp_path)
    reader = app.backend
    reader.store_result("t1", {"first": "x" * 100}, states.STARTED)
    halfway, go_on = threading.Event(), threading.Event()

    def slow_open(path: Any, mode: str = "r", *args: Any) -> Any:
        file = open(path, mode, *args)  # noqa: SIM115 (closed by _SlowFile)
        slow = "w" in mode and b"task-meta" in os.fsencode(path)  # not its directory test
        return _SlowFile(file, halfway, go_on) if slow else file

    writer = type(reader)(url=reader.url, app=app, open=slow_open)
    thread = threading.Thread(target=writer.store_result, args=("t1", "second", states.SUCCESS))
    thread.start()
    try:
        assert halfway.wait(10)
        assert read(reader, "t1") == {"first": "x" * 100}
    finally:
        go_on.set()
        thread.join(10)
    assert read(reader, "t1") == "second"

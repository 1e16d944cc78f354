"""The embedded broker: complete message files, consumed in the order they were sent."""

from __future__ import annotations

from pathlib import Path

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

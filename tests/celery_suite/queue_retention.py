"""Start and stop one embedded worker with ``SessionFlow(app)``; report what its queues left.

    python queue_retention.py STORE_URL [NODE_NAME]

Prints JSON: the worker's node name, its session and creation queues, and the
``_kombu.binding*`` keys of those queues still in Redis after it stopped (which it
then deletes). Without NODE_NAME the worker gets Celery's generated name
(``gen<pid>@host``), as in Celery's own test suite. Holds run_suite's lock on the
databases throughout. Used by tests/integration/test_celery_suite.py.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu.connection import Connection
from run_suite import BROKER_DB, REDIS_HOST, REDIS_PORT, exclusive, redis_client

from sessionflow import SessionFlow
from sessionflow.canvas import make_queue


def main(argv: list[str]) -> None:
    broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}"
    options: dict[str, Any] = {"hostname": argv[1]} if len(argv) > 1 else {}
    app = Celery("queue_retention", broker=broker, set_as_current=False)
    app.conf.sessionflow_database_url = argv[0]
    flow = SessionFlow(app)
    with exclusive():
        with start_worker(app, pool="solo", perform_ping_check=False, **options) as worker:
            nodename = worker.hostname
        queues = [flow.config.worker_queue(nodename), flow.config.worker_creation_queue(nodename)]
        client = redis_client(BROKER_DB)
        left = sorted(k.decode() for q in queues for k in client.keys(f"_kombu.binding*.{q}"))
        with Connection(broker) as conn:
            for name in queues:
                queue = make_queue(name)(conn.default_channel)
                queue.declare()  # kombu's Redis transport deletes only what it declared
                queue.delete()
    print(json.dumps({"nodename": nodename, "queues": queues, "left": left}))


if __name__ == "__main__":
    main(sys.argv[1:])

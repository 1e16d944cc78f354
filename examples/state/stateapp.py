"""The Celery app of the session-state examples: tasks that share memory through the session.

Workers run it as ``celery -A stateapp worker``. Without ``STATE_EXAMPLE_*``
variables everything is embedded under ``STATE_EXAMPLE_DIR`` (a filesystem broker,
file results, SQLite); set ``STATE_EXAMPLE_BROKER``, ``STATE_EXAMPLE_BACKEND`` and
``STATE_EXAMPLE_DATABASE`` to use Redis/RabbitMQ and PostgreSQL instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

from sessionflow import SessionFlow, current_session, fsbroker

HERE = Path(__file__).resolve().parent

USERS = {42: {"id": 42, "name": "Ada Lovelace", "tier": "gold"}}
ORDERS = {42: [{"id": "o-1", "amount": 120.0}, {"id": "o-2", "amount": 35.5}]}


def create_app() -> Celery:
    data = Path(os.environ.get("STATE_EXAMPLE_DIR", HERE / ".state-example"))
    app = Celery("stateapp")
    broker = os.environ.get("STATE_EXAMPLE_BROKER")
    if broker:
        app.conf.broker_url = broker
        app.conf.result_backend = os.environ["STATE_EXAMPLE_BACKEND"]
    else:
        app.conf.update(fsbroker.settings(data))
        (data / "results").mkdir(parents=True, exist_ok=True)
        app.conf.result_backend = fsbroker.result_backend(data / "results")
    app.conf.sessionflow_database_url = os.environ.get(
        "STATE_EXAMPLE_DATABASE", f"sqlite:///{data / 'sessionflow.db'}"
    )
    flow = SessionFlow(app)
    # A reducer by name must be registered in every process that may merge branches:
    # here, in the module both the client and the workers import.
    flow.register_reducer("longest", lambda current, new: max(current or "", new, key=len))
    return app


app = create_app()


def state() -> Any:
    session = current_session()
    if session is None:
        raise RuntimeError("this task runs only inside a session")
    return session.state


# -- the three-step workflow: user -> orders -> report ----------------------------------


@app.task
def fetch_user() -> str:
    st = state()
    user = USERS[st["customer_id"]]
    st["user"] = user
    st.increment("user:visits")  # shared by every session of this user_id
    return user["name"]


@app.task
def fetch_orders() -> int:
    st = state()
    orders = ORDERS[st["user"]["id"]]
    st["orders"] = orders
    return len(orders)


@app.task
def build_report() -> str:
    st = state()
    user, orders = st["user"], st["orders"]
    total = sum(order["amount"] for order in orders)
    report = f"{user['name']} ({user['tier']}): {len(orders)} orders, {total:.2f} total"
    st["report"] = report
    return report


# -- parallel fan-out that merges ------------------------------------------------------


@app.task
def analyse(index: int, text: str) -> int:
    """One branch: reads the state as dispatched, writes to its own copy."""
    st = state()
    words = text.split()
    time.sleep(0.05 * (len(words) % 3))  # finish in a scrambled order
    st.increment("words", len(words))  # merged as an operation: every branch counts
    st.append("seen", index)  # appends land in member order
    st["longest_word"] = max(words, key=len)  # reducer "longest" picks across branches
    st[f"doc{index}"] = {"words": len(words), "prefix": st["prefix"]}
    return len(words)


@app.task
def summarise(counts: list[int]) -> dict[str, Any]:
    """The chord body: starts after the branches merged."""
    st = state()
    return {"counts": counts, "words": st["words"], "seen": st["seen"]}

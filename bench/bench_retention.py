"""Store size over many session lifecycles, with and without retention.

Each cycle is what one short session leaves in the store: create (pending),
admit (open), one dispatched task, its run as the worker's writer records it, a
state key, the end and its settlement. With ``sessionflow_retention = 0`` the
sweeper's pruning (``sessionflow.retention.prune``, the same function the worker
runs every 30 s) runs every ``--prune-every`` cycles; without retention it never
runs. The store size is printed every 1,000 cycles: flat with retention 0, growing
without it.

Run from the repository root::

    .venv/bin/python bench/bench_retention.py                    # SQLite and PostgreSQL
    .venv/bin/python bench/bench_retention.py --cycles 2000 --stores sqlite

No worker is started: this measures what the store keeps, not throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import open_session
from sqlalchemy import create_engine, text

from sessionflow.config import Config
from sessionflow.enums import SessionStatus
from sessionflow.records import Dispatch, Run, utcnow
from sessionflow.retention import prune
from sessionflow.store.base import StateWrite
from sessionflow.store.sql import SQLStore

PG_ADMIN = "postgresql://127.0.0.1:5432/test"


def cycle(store: SQLStore, n: int) -> None:
    sid = open_session(store, "bench@local", "bench.q", execution_timeout=60)
    task_id = str(uuid.uuid4())
    store.dispatch(Dispatch(sid, ((task_id, "bench.noop"),)))
    store.state_write(sid, [StateWrite("session", sid, "k", {"n": n}, 9)], 1 << 20)
    now = utcnow()
    store.record_runs([Run(task_id, 0, sid, "bench.noop", "SUCCESS", "bench@local", now, now)])
    store.end_session(sid, SessionStatus.CLOSED, "completed")
    store.settle(sid)


def size(url: str) -> int:
    """Bytes the store's tables and indexes take (SQLite: pages in use; PG: relation sizes)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                pages = conn.execute(text("PRAGMA page_count")).scalar_one()
                free = conn.execute(text("PRAGMA freelist_count")).scalar_one()
                page = conn.execute(text("PRAGMA page_size")).scalar_one()
                return int((pages - free) * page)
            return int(
                conn.execute(
                    text(
                        "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE c.relkind = 'r' AND c.relname LIKE 'sf\\_%'"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def run(url: str, cycles: int, retention: float | None, prune_every: int) -> list[dict[str, Any]]:
    store = SQLStore(Config(database_url=url))
    if not url.startswith("sqlite"):
        store.upgrade()
    points = []
    started = time.perf_counter()
    for n in range(1, cycles + 1):
        cycle(store, n)
        if retention is not None and n % prune_every == 0:
            prune(store, retention, 1000)
        if n % 1000 == 0:
            points.append({"cycles": n, "bytes": size(url), "s": time.perf_counter() - started})
            print(f"  {n:>6} cycles: {points[-1]['bytes'] / 1024:8.0f} KiB", file=sys.stderr)
    store.dispose()
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--prune-every", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for store_name in args.stores.split(","):
        for retention in (0.0, None):
            label = f"{store_name}, retention {'0 s' if retention == 0 else 'None'}"
            print(label, file=sys.stderr)
            if store_name == "sqlite":
                folder = tempfile.mkdtemp(prefix="sfbench-retention-")
                report[label] = run(
                    f"sqlite:///{folder}/store.db", args.cycles, retention, args.prune_every
                )
                continue
            import psycopg

            name = f"sfbench_ret_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {name}")
            try:
                url = f"postgresql+psycopg://127.0.0.1:5432/{name}"
                report[label] = run(url, args.cycles, retention, args.prune_every)
            finally:
                with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    print(f"\nstore size after N create/complete cycles (KiB), sessionflow {_version()}")
    labels = list(report)
    print("cycles  " + "  ".join(f"{label:>28}" for label in labels))
    for i in range(len(next(iter(report.values())))):
        row = [report[label][i] for label in labels]
        print(f"{row[0]['cycles']:>6}  " + "  ".join(f"{p['bytes'] / 1024:>28.0f}" for p in row))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _version() -> str:
    import sessionflow

    return f"{sessionflow.__version__} from {os.path.dirname(sessionflow.__file__)}"


if __name__ == "__main__":
    sys.exit(main())

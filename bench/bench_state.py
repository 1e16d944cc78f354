"""Benchmark session state against hand-written SQLAlchemy Core on the same database.

    .venv/bin/python bench/bench_state.py [--store sqlite|postgres|all] [-n 2000]

For each store it prints, in one run:

- ``state.set`` and ``state.get`` p50 divided by the same single-row operation
  (an upsert of a JSON value with an integer version / a primary-key select)
  written directly with SQLAlchemy Core, on the same database, through the same
  engines and connection settings (target: <= 1.5);
- ``state.increment`` throughput with 4 writer processes hammering one key, next
  to 4 processes running a hand-written atomic ``UPDATE ... SET v = v + 1``;
  the final count is checked to be exact.

No workers are needed: state calls go straight to the store.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import PG_ADMIN_URL, PG_HOST, PG_PORT, open_session, service_up
from celery import Celery
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from sessionflow import Session, SessionFlow
from sessionflow.store.sql import SQLStore

WRITERS = 4
raw_meta = MetaData()
raw_kv = Table(
    "bench_raw_kv",
    raw_meta,
    Column("k", String(255), primary_key=True),
    Column("v", JSON),
    Column("version", Integer, nullable=False),
)


def make_flow(url: str) -> SessionFlow:
    app = Celery("benchstate", broker="memory://", set_as_current=False)
    app.conf.sessionflow_database_url = url
    return SessionFlow(app)


def make_session(flow: SessionFlow) -> Session:
    return flow.get_session(open_session(flow.store, "bench-state@local", "bench"))


def engines(flow: SessionFlow) -> tuple[Any, Any]:
    """The store's own (write, read) engines: the baseline runs on the same connections."""
    store = flow.store
    if not isinstance(store, SQLStore):
        raise TypeError(f"bench_state needs an SQL store, not {type(store).__name__}")
    return store.engines.get()


def paired_p50(
    first: Callable[[int], Any], second: Callable[[int], Any], n: int
) -> tuple[float, float]:
    """p50 of two operations sampled alternately, so machine noise hits both alike."""
    for i in range(min(200, n)):  # warm up pools and caches
        first(i)
        second(i)
    a, b = [], []
    for i in range(n):
        for fn, times in ((first, a), (second, b)):
            started = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - started)
    return statistics.median(a), statistics.median(b)


def raw_ops(flow: SessionFlow) -> tuple[Callable[[int], None], Callable[[int], Any]]:
    """The same single-row operations, hand-written with SQLAlchemy Core (statements built once)."""
    write_engine, read_engine = engines(flow)
    raw_meta.create_all(write_engine)
    insert = (pg_insert if write_engine.dialect.name == "postgresql" else sqlite_insert)(raw_kv)
    upsert = insert.on_conflict_do_update(
        index_elements=[raw_kv.c.k],
        set_={"v": insert.excluded.v, "version": raw_kv.c.version + 1},
    ).returning(raw_kv.c.version)
    query = select(raw_kv.c.v, raw_kv.c.version).where(raw_kv.c.k == bindparam("k"))

    def raw_set(i: int) -> None:
        with write_engine.begin() as conn:
            conn.execute(upsert, {"k": "key", "v": {"n": i, "s": "value"}, "version": 1})

    def raw_get(i: int) -> Any:
        with read_engine.connect() as conn:
            return conn.execute(query, {"k": "key"}).first()

    return raw_set, raw_get


def latency(flow: SessionFlow, n: int) -> dict[str, float]:
    state = make_session(flow).state
    raw_set, raw_get = raw_ops(flow)
    out: dict[str, float] = {}
    out["raw set"], out["state.set"] = paired_p50(
        raw_set, lambda i: state.set("key", {"n": i, "s": "value"}), n
    )
    out["raw get"], out["state.get"] = paired_p50(raw_get, lambda i: state.get("key"), n)
    cas = flow.get_session(state._session_id).state
    _, out["state.get+set (compare-and-set)"] = paired_p50(
        raw_get, lambda i: cas.set("key", {"n": i, "s": cas.get("key")["s"]}), n
    )
    return out


# -- increment throughput with 4 writer processes -----------------------------------


def _state_writer(url: str, session_id: str, key: str, times: int, start: Any) -> None:
    state = make_flow(url).get_session(session_id).state
    state.get(key)  # connect before the clock starts
    start.wait()
    for _ in range(times):
        state.increment(key)


def _raw_writer(url: str, key: str, times: int, start: Any) -> None:
    engine = engines(make_flow(url))[0]
    with engine.begin() as conn:
        conn.execute(select(raw_kv.c.k).where(raw_kv.c.k == key))
    start.wait()
    for _ in range(times):
        with engine.begin() as conn:
            conn.execute(
                update(raw_kv).where(raw_kv.c.k == key).values(version=raw_kv.c.version + 1)
            )


def throughput(flow: SessionFlow, url: str, total: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    session = make_session(flow)
    per = total // WRITERS
    key = f"app:bench-{uuid.uuid4().hex[:8]}"
    raw_key = f"raw-{key}"
    write_engine = engines(flow)[0]
    with write_engine.begin() as conn:
        conn.execute(raw_kv.insert().values(k=raw_key, v=None, version=0))
    results = {}
    for label, target, args in (
        ("state.increment", _state_writer, (url, session.id, key, per)),
        ("raw UPDATE v = v + 1", _raw_writer, (url, raw_key, per)),
    ):
        start = ctx.Event()
        procs = [ctx.Process(target=target, args=(*args, start)) for _ in range(WRITERS)]
        for proc in procs:
            proc.start()
        time.sleep(3)  # let every process import and connect
        began = time.perf_counter()
        start.set()
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"a {label} writer failed (exit code {proc.exitcode})")
        results[label] = per * WRITERS / (time.perf_counter() - began)
    final = session.state[key]
    if final != per * WRITERS:
        raise SystemExit(f"LOST UPDATES: {final} != {per * WRITERS}")
    results["final count"] = final
    return results


# -- stores ------------------------------------------------------------------------------


def run_store(store: str, n: int, total: int) -> None:
    pg_db = None
    if store == "sqlite":
        url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='sfbench-')) / 'state.db'}"
    else:
        if not service_up(PG_HOST, PG_PORT):
            print(f"postgres: skipped, nothing listens on {PG_HOST}:{PG_PORT}")
            return
        pg_db = f"sfbench_state_{uuid.uuid4().hex[:8]}"
        _pg_admin(f"CREATE DATABASE {pg_db}")
        url = f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/{pg_db}"
    try:
        flow = make_flow(url)
        if store == "postgres":
            flow.store.upgrade()
        lat = latency(flow, n)
        rate = throughput(flow, url, total)
        flow.store.dispose()
    finally:
        logging.getLogger("sessionflow").setLevel(logging.ERROR)  # its client watcher thread
        if pg_db:
            _pg_admin(f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")
    set_ratio = lat["state.set"] / lat["raw set"]
    get_ratio = lat["state.get"] / lat["raw get"]
    raw_rate, state_rate = rate["raw UPDATE v = v + 1"], rate["state.increment"]
    print(f"\n== {store} ({n} samples each, p50) ==")
    for name in ("raw set", "state.set", "raw get", "state.get", "state.get+set (compare-and-set)"):
        print(f"  {name:34s} {lat[name] * 1000:8.3f} ms")
    print(f"  {'set ratio state.set / raw set':34s} {set_ratio:8.2f}    (target <= 1.5)")
    print(f"  {'get ratio state.get / raw get':34s} {get_ratio:8.2f}    (target <= 1.5)")
    print(f"== {store}: {WRITERS} writer processes, one key, {total} increments ==")
    print(f"  {'state.increment':34s} {state_rate:8.0f} ops/s")
    print(f"  {'raw UPDATE v = v + 1':34s} {raw_rate:8.0f} ops/s")
    print(f"  {'ratio raw / state':34s} {raw_rate / state_rate:8.2f}")
    print(f"  {'final count':34s} {rate['final count']:8d}    (exact)")


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "postgres", "all"), default="all")
    parser.add_argument("-n", type=int, default=2000, help="samples per latency figure")
    parser.add_argument("--increments", type=int, default=4000, help="total increments")
    args = parser.parse_args(argv)
    stores = ("sqlite", "postgres") if args.store == "all" else (args.store,)
    for store in stores:
        run_store(store, args.n, args.increments)
    return 0


if __name__ == "__main__":
    sys.exit(main())

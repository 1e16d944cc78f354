"""The session store: its contract on every backend, and what only the SQL store has.

``StoreContract`` (the ``store_contract`` package) runs against MemoryStore, SQLite
(a copy of a migrated file per test) and PostgreSQL (one scratch database per
module, emptied before each test). The tests below it cover the SQL store alone: migrations,
engines, errors and transactions interleaved on two connections.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, inspect
from store_contract import (
    NODE,
    NODE2,
    QUEUE,
    QUEUE2,
    StoreContract,
    opened,
    pending,
    run,
    send,
    statuses_of,
)
from store_contract.helpers import race, rules

from sessionflow.config import Config
from sessionflow.enums import SessionStatus, TaskStatus
from sessionflow.errors import StoreError
from sessionflow.records import GroupSpec
from sessionflow.retention import prune as retention_prune
from sessionflow.store import SessionStore, open_store
from sessionflow.store.memory import MemoryStore
from sessionflow.store.sql import SQLStore, migrate
from sessionflow.store.sql.models import Base

PASSWORD = "s3cret-pw"
# Tables the migrations build that no model describes.
NOT_MODELLED = {migrate.VERSION_TABLE, "sf_dispatches"}


# -- backends ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each test works on a copy."""
    path = tmp_path_factory.mktemp("template") / "store.db"
    SQLStore(Config(database_url=f"sqlite:///{path}")).upgrade()
    assert not Path(f"{path}-wal").exists()  # everything is in the file itself
    return path


@pytest.fixture(scope="module")
def pg_admin_engine(pg_module_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_module_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_module_url: str, pg_admin_engine: Engine) -> str:
    """The module's PostgreSQL database, emptied."""
    with pg_admin_engine.begin() as conn:  # DELETE: faster than TRUNCATE on tiny tables
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    return pg_module_url


def sqlite_copy(template: Path, folder: Path) -> str:
    path = folder / "store.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self) -> Iterator[SessionStore]:
        yield MemoryStore()


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store(self, sqlite_template: Path, tmp_path: Path) -> Iterator[SessionStore]:
        store = open_store(Config(database_url=sqlite_copy(sqlite_template, tmp_path)))
        assert store.dialect == "sqlite"
        yield store
        store.dispose()


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store(self, pg_url: str) -> Iterator[SessionStore]:
        store = open_store(Config(database_url=pg_url))
        assert store.dialect == "postgresql"
        yield store
        store.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def sql_store(
    request: pytest.FixtureRequest, sqlite_template: Path, tmp_path: Path
) -> Iterator[SQLStore]:
    if request.param == "sqlite":
        url = sqlite_copy(sqlite_template, tmp_path)
    else:
        url = request.getfixturevalue("pg_url")
    store = SQLStore(Config(database_url=url))
    yield store
    store.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- schema ----------------------------------------------------------------------------------


def test_migrations_on_an_empty_sqlite_database(tmp_path: Path) -> None:
    store = SQLStore(Config(database_url=f"sqlite:///{tmp_path / 'new.db'}"))
    assert store.revision() is None
    assert store.upgrade() == migrate.head_revision()
    assert store.revision() == migrate.head_revision()
    assert store.upgrade() == migrate.head_revision()  # again: nothing to do
    assert {t.name for t in Base.metadata.sorted_tables} <= tables(
        f"sqlite:///{tmp_path / 'new.db'}"
    )


def test_migrations_on_an_empty_postgres_database(make_pg_url: Callable[[], str]) -> None:
    url = make_pg_url()
    store = SQLStore(Config(database_url=url))
    try:
        assert store.revision() is None
        with pytest.raises(StoreError, match="sessionflow db upgrade") as info:
            store.get_session("x")  # PostgreSQL is never migrated behind one's back
        assert "None" in str(info.value)
        assert "sf_sessions" not in tables(url)
        # upgraded by another process: the same store object works now
        assert SQLStore(Config(database_url=url)).upgrade() == migrate.head_revision()
        assert store.revision() == migrate.head_revision()
        assert store.get_session("x") is None
        assert store.get_session(pending(store)) is not None
    finally:
        store.dispose()


def test_sqlite_migrates_itself_on_first_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    store = SQLStore(Config(database_url=url))
    try:
        assert store.get_session("nothing") is None
        assert store.revision() == migrate.head_revision()
    finally:
        store.dispose()


def test_sqlite_without_auto_migrate_asks_for_an_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    store = SQLStore(Config(database_url=url, auto_migrate=False))
    try:
        with pytest.raises(StoreError, match="sessionflow db upgrade"):
            store.get_session("x")
        assert "sf_sessions" not in tables(url)
    finally:
        store.dispose()


def test_an_old_schema_asks_for_an_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        migrate.upgrade(conn, "0003")
    engine.dispose()
    strict = SQLStore(Config(database_url=url, auto_migrate=False))
    with pytest.raises(StoreError, match="sessionflow db upgrade") as info:
        pending(strict)
    assert "'0003'" in str(info.value) and repr(migrate.head_revision()) in str(info.value)
    strict.dispose()
    auto = SQLStore(Config(database_url=url))
    try:
        assert auto.get_session(pending(auto)) is not None
        assert auto.revision() == migrate.head_revision()
    finally:
        auto.dispose()


def test_sqlite_state_numbers_written_before_0006_come_back_at_full_precision(
    tmp_path: Path,
) -> None:
    # Before 0006 SQLite stored a number-looking value as REAL or INTEGER (NUMERIC
    # affinity); the migration rewrites them as JSON text from full-precision floats
    # (SQLite's own CAST to text keeps 15 digits: 0.30000000000000004 would become 0.3).
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    written = {"f": 0.1 + 0.2, "i": 2**62, "s": "text", "d": {"x": 2.0}}
    with engine.begin() as conn:
        migrate.upgrade(conn, "0005")
        for key, value in written.items():
            conn.exec_driver_sql(
                "INSERT INTO sf_state (scope, scope_id, key, value, size, version, deleted,"
                " updated_at) VALUES ('app', '', ?, ?, 1, 1, 0, '2026-12-07 00:00:00.000000')",
                (key, json.dumps(value)),
            )
        kinds = dict(conn.exec_driver_sql("SELECT key, typeof(value) FROM sf_state").all())
    assert kinds == {"f": "real", "i": "integer", "s": "text", "d": "text"}  # as 0005 kept them
    engine.dispose()
    store = SQLStore(Config(database_url=url))
    try:
        assert store.upgrade() == migrate.head_revision()
        read = {key: store.state_read("app", "", key)[0] for key in written}
        assert read == written and type(read["f"]) is float and type(read["i"]) is int
        assert read["f"] == 0.30000000000000004
    finally:
        store.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_migrated_by_a_newer_sessionflow_says_so(
    backend: str, tmp_path: Path, make_pg_url: Callable[[], str]
) -> None:
    # An unknown revision went to Alembic: CommandError "Can't locate revision" from
    # every call on SQLite, and on PostgreSQL advice to run `db upgrade`, which crashed.
    url = f"sqlite:///{tmp_path / 'new.db'}" if backend == "sqlite" else make_pg_url()
    SQLStore(Config(database_url=url)).upgrade()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE sf_alembic_version SET version_num = '9999'")
    engine.dispose()
    store = SQLStore(Config(database_url=url))
    try:
        for call in (lambda: store.get_session("x"), store.upgrade):
            with pytest.raises(StoreError, match="newer sessionflow") as info:
                call()
            assert "'9999'" in str(info.value) and "upgrade sessionflow" in str(info.value)
        assert store.revision() == "9999"
    finally:
        store.dispose()


@pytest.mark.parametrize("how", ["upgrade", "first use"])
def test_upgrading_sqlite_from_0001_keeps_the_task_rows(tmp_path: Path, how: str) -> None:
    # 0002 rebuilds sf_sessions (Alembic's batch mode: copy, DROP, rename); with the
    # store's foreign keys on, the DROP cascaded and emptied sf_session_tasks.
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        migrate.upgrade(conn, "0001")
        conn.exec_driver_sql(
            "INSERT INTO sf_sessions (id, status, creation_timeout, execution_timeout, turns,"
            " created_at) VALUES ('s1', 'open', 1, 10, 1, '2026-12-07 00:00:00.000000')"
        )
        conn.exec_driver_sql(
            "INSERT INTO sf_session_tasks (task_id, session_id, name, state, dispatched_at)"
            " VALUES ('t1', 's1', 'x', 'success', '2026-12-07 00:00:00.000000')"
        )
    engine.dispose()
    store = SQLStore(Config(database_url=url))
    try:
        if how == "upgrade":
            assert store.upgrade() == migrate.head_revision()
        else:
            assert store.get_session("s1") is not None  # migrates itself first
        assert [t.task_id for t in store.tasks("s1")] == ["t1"]
    finally:
        store.dispose()
    store = SQLStore(Config(database_url=url))
    try:  # foreign keys are on again for the store's own work: deleting cascades
        store.get_session("s1")
        with store.engines.get()[0].begin() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_models_describe_what_the_migrations_build(
    backend: str, request: pytest.FixtureRequest, sqlite_template: Path
) -> None:
    url = (
        f"sqlite:///{sqlite_template}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_module_url")
    )
    engine = create_engine(url)
    try:
        built = inspect(engine)
        names = set(built.get_table_names()) - NOT_MODELLED
        described = {t.name: t for t in Base.metadata.sorted_tables}
        assert names == set(described)
        for name, table in described.items():
            columns = {c["name"]: c["nullable"] for c in built.get_columns(name)}
            assert columns == {c.name: c.nullable for c in table.columns}, name
            indexes = {
                (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
                for ix in built.get_indexes(name)
            }
            modelled = {
                (ix.name, tuple(c.name for c in ix.columns), bool(ix.unique))
                for ix in table.indexes
            }
            assert indexes == modelled, name
    finally:
        engine.dispose()


# -- errors ----------------------------------------------------------------------------------


def test_unreachable_database_is_a_store_error_without_the_password() -> None:
    url = f"postgresql+psycopg://sfuser:{PASSWORD}@127.0.0.1:1/nothing"
    store = SQLStore(Config(database_url=url))
    for call in (lambda: store.get_session("x"), store.revision, store.upgrade):
        with pytest.raises(StoreError) as info:
            call()
        message = str(info.value)
        assert "sfuser:***@127.0.0.1:1" in message and PASSWORD not in message
        assert info.value.__cause__ is None and info.value.__suppress_context__
    assert PASSWORD not in repr(store)


def test_missing_driver_is_a_store_error() -> None:
    store = SQLStore(Config(database_url=f"nosuchdialect://sfuser:{PASSWORD}@host/db"))
    with pytest.raises(StoreError, match="sessionflow_database_url") as info:
        store.get_session("x")
    assert PASSWORD not in str(info.value)


def test_a_store_fixed_after_a_failed_start_works(tmp_path: Path) -> None:
    folder = tmp_path / "not-yet"
    store = SQLStore(Config(database_url=f"sqlite:///{folder / 'store.db'}"))
    try:
        with pytest.raises(StoreError, match="cannot reach the session store"):
            pending(store)
        folder.mkdir()
        session_id = pending(store)  # the same object, no new process
        assert store.get_session(session_id) is not None
    finally:
        store.dispose()


def test_the_secret_is_shared_through_the_store(sql_store: SQLStore) -> None:
    other = SQLStore(sql_store.config)
    try:
        assert other.secret() == sql_store.secret()
    finally:
        other.dispose()


# -- processes and connections -----------------------------------------------------------------


def backend_pid(store: SQLStore) -> int | None:
    """The PostgreSQL backend of the store's pooled connection (None on SQLite)."""
    if store.dialect != "postgresql":
        return None
    with store.engines.get()[0].connect() as conn:
        pid: int = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        return pid


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_engines_never_cross_a_fork(sql_store: SQLStore) -> None:
    store = sql_store
    parent = opened(store)
    send(store, parent, "p1")
    connection = backend_pid(store)  # the pool holds this one connection
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: use the inherited store object, report the new session id
        code = 1
        try:
            os.close(read_fd)
            ok = store.statuses([parent])[parent][0] is SessionStatus.OPEN
            child = opened(store, node=NODE2, queue=QUEUE2)
            ok = ok and send(store, child, "c1") == QUEUE2
            if ok:
                os.write(write_fd, child.encode())
                code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        child = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # The child neither used nor closed the parent's connection, which still works.
    assert backend_pid(store) == connection
    assert store.statuses([child])[child][0] is SessionStatus.OPEN
    assert statuses_of(store, child) == {"c1": TaskStatus.PENDING}
    store.record_runs([run(parent, "p1")])
    assert store.end_session(parent, SessionStatus.CLOSED, "completed")


# -- transactions interleaved on two connections -------------------------------------------------


def interleave(
    store: SQLStore, prefix: str, must_contain: str, racer: Callable[[], Any]
) -> tuple[threading.Event, list[Any], Callable[[], None]]:
    """Run ``racer`` in another thread, on a connection of its own, right before the
    store sends the first statement that starts with ``prefix``.

    PostgreSQL lets the racer commit in between; SQLite makes it wait for the
    transaction to end (the write lock), so the racer is given 0.3 s there.
    """
    engine = store.engines.get()[0]
    fired = threading.Event()
    results: list[Any] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = statement.lstrip().upper()
        if fired.is_set() or not text.startswith(prefix) or must_contain not in text:
            return
        fired.set()
        thread = threading.Thread(target=lambda: results.append(racer()), daemon=True)
        thread.start()
        thread.join(10 if store.dialect == "postgresql" else 0.3)

    event.listen(engine, "before_cursor_execute", before)

    def remove() -> None:
        event.remove(engine, "before_cursor_execute", before)

    return fired, results, remove


def wait_for(results: list[Any], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not results and time.monotonic() < deadline:
        time.sleep(0.01)


def test_abandon_pending_vs_admit_interleaved(sql_store: SQLStore) -> None:
    """abandon_pending runs between admit's read and its update: exactly one wins."""
    store = sql_store
    session_id = pending(store)
    fired, abandoned, remove = interleave(
        store,
        "UPDATE SF_SESSIONS",
        "OPENED_AT",
        lambda: store.abandon_pending(session_id, "creation_timeout"),
    )
    try:
        admitted = store.admit(session_id, NODE, QUEUE)
    finally:
        remove()
    wait_for(abandoned)
    assert fired.is_set() and len(abandoned) == 1
    assert (admitted is not None) != abandoned[0], (admitted, abandoned)
    status = store.statuses([session_id])[session_id][0]
    assert status is (SessionStatus.OPEN if admitted else SessionStatus.FAILED)
    if store.dialect == "postgresql":  # the abandon committed in between: admit saw it
        assert abandoned == [True] and admitted is None
    else:  # admit's write transaction held the lock
        assert abandoned == [False] and admitted is not None


def test_task_start_vs_settle_interleaved(sql_store: SQLStore) -> None:
    """A run recorded while settle runs: the task is cancelled or started, never both."""
    store = sql_store
    session_id = opened(store)
    send(store, session_id, "t1")
    assert store.end_session(session_id, SessionStatus.CLOSED, "completed")

    def start() -> bool:
        store.record_runs([run(session_id, "t1")])
        return True

    fired, recorded, remove = interleave(store, "UPDATE SF_SESSION_TASKS", "", start)
    try:
        ended = store.settle(session_id)
    finally:
        remove()
    wait_for(recorded)
    assert fired.is_set() and recorded == [True] and ended is not None
    cancelled = "t1" in ended.cancelled
    status = statuses_of(store, session_id)["t1"]
    assert status is (TaskStatus.CANCELLED if cancelled else TaskStatus.STARTED)
    # PostgreSQL: the run committed before the settling statement, which saw it.
    assert cancelled is (store.dialect == "sqlite")


# -- space ---------------------------------------------------------------------------------


def store_bytes(store: SQLStore) -> int:
    """What the store's tables take: SQLite pages in use, PostgreSQL relation sizes."""
    engine = create_engine(store.engines.config.database_url)
    try:
        with engine.connect() as conn:
            if store.dialect == "sqlite":
                pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
                free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
                return int((pages - free) * conn.exec_driver_sql("PRAGMA page_size").scalar_one())
            return int(
                conn.exec_driver_sql(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                    "WHERE c.relkind = 'r' AND c.relname LIKE 'sf\\_%%'"
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_pruned_space_is_reused(sql_store: SQLStore) -> None:
    """With retention 0, rounds of session lifecycles leave the store the size it had
    after the second (the first two fill the pages then reused). PostgreSQL grew ~1 MB
    per 1,000 sessions (dead rows wait for autovacuum) until a prune that deleted rows
    vacuumed the tables it churns."""
    store = sql_store
    sizes = []
    for _ in range(5):
        for _ in range(150):
            session_id = opened(store)
            send(store, session_id, "t1")
            store.record_runs([run(session_id, "t1", "SUCCESS")])
            store.end_session(session_id, SessionStatus.CLOSED, "completed")
            store.settle(session_id)
        assert retention_prune(store, 0, 1000).sessions == 150
        sizes.append(store_bytes(store))
    assert sizes[-1] <= sizes[1] + 16 * 1024, sizes  # a few pages of slack; it grew ~95 KiB a round


# -- branches: the end of a group member -------------------------------------------------


def test_a_group_member_ends_in_one_statement_on_postgres(pg_url: str) -> None:
    """Insert of the step row and the group's count in one statement (a CTE): a member
    that does not complete its group costs one round trip (two before)."""
    store = SQLStore(Config(database_url=pg_url))
    try:
        session_id = opened(store)
        send(store, session_id, "a", "b", groups=(GroupSpec("g1", 2, True),))
        seen: list[str] = []

        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement.split(None, 1)[0].upper())

        engine = store.engines.get()[0]
        event.listen(engine, "before_cursor_execute", before)
        try:
            assert store.branch_done("g1", 0, 0, [("increment", "n", 1)], rules) is None
            assert seen == ["WITH"]
            assert store.branch_done("g1", 0, 0, [("increment", "n", 1)], rules) is None
            assert len(seen) == 2  # a redelivered member: counted once, nothing merged
        finally:
            event.remove(engine, "before_cursor_execute", before)
        assert store.branch_done("g1", 1, 0, [("increment", "n", 2)], rules) is None
        assert store.state_read("session", session_id, "n")[0] == 3
        assert store.branch_view("g1", 0, 0) is None  # merged
    finally:
        store.dispose()


def test_group_members_ending_at_once_merge_every_member_once(sql_store: SQLStore) -> None:
    store = sql_store
    session_id = opened(store)
    ids = [f"m{i}" for i in range(8)]
    send(store, session_id, *ids, groups=(GroupSpec("g8", 8, True),))
    ends = [
        (lambda i=i: store.branch_done("g8", i, 0, [("increment", "n", 1 << i)], rules))
        if i % 3
        else (lambda i=i: store.branch_failed("g8", i, 0, 1, rules))
        for i in range(8)
    ]
    assert race(*ends) == [None] * 8
    assert store.state_read("session", session_id, "n")[0] == sum(1 << i for i in range(8) if i % 3)
    assert store.branch_view("g8", 0, 0) is None

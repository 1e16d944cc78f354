"""Engines per process, the schema check, and errors translated for callers.

Engines never cross a fork: a process that finds engines made by its parent
disposes of them (``close=False``) and makes its own. The schema check runs until
it succeeds once in a process, so a store fixed after a failed start (directory
created, ``db upgrade`` run) works without restarting the process.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    SQLAlchemyError,
)

from ...config import Config
from ...errors import InvalidArgument, SessionFlowError, StoreError, StoreRefused
from . import migrate

_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}
UPGRADE_HINT = "run `sessionflow db upgrade --url URL` (or `-A yourapp`) first"


class Engines:
    """The write and read engines of one store in this process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._write: Engine | None = None
        self._read: Engine | None = None
        self._ready = False  # the schema check passed in this process

    def get(self) -> tuple[Engine, Engine]:
        pid = os.getpid()
        write, read = self._write, self._read
        if self._ready and self._pid == pid and write is not None and read is not None:
            return write, read
        with self._lock:
            if self._pid != pid or self._write is None or self._read is None:
                for inherited in {self._write, self._read} - {None}:
                    assert inherited is not None
                    inherited.dispose(close=False)  # the parent process keeps its sockets
                self._write, self._read = self.create()
                self._pid, self._ready = pid, False
            if not self._ready:
                self._prepare(self._write)
                self._ready = True
            return self._write, self._read

    def create(self) -> tuple[Engine, Engine]:
        config = self.config
        try:
            if not config.is_sqlite:
                engine = create_engine(config.database_url, **config.engine_options)
                _ping_when_idle(engine)
                return engine, engine
            return (
                _sqlite_engine(config.database_url, config.engine_options, immediate=True),
                _sqlite_engine(config.database_url, config.engine_options, immediate=False),
            )
        except Exception as exc:  # bad URL, missing driver; messages may carry the URL
            raise StoreError(
                f"cannot use sessionflow_database_url {config.masked_url}: "
                f"{type(exc).__name__}. Check the URL and that its database driver is installed."
            ) from None

    def _prepare(self, engine: Engine) -> None:
        head = migrate.head_revision()
        try:
            with _migrating(engine) as conn:
                current = migrate.current_revision(conn)
                if current == head:
                    return
                self._check_known(current)
                if self.config.is_sqlite and self.config.auto_migrate:
                    migrate.upgrade(conn)
                    return
        except DBAPIError as exc:
            raise StoreError(
                f"cannot reach the session store at {self.config.masked_url}: "
                f"{_reason(exc)}. Is the database running and the URL right?"
            ) from None
        raise StoreError(
            f"the session store at {self.config.masked_url} is at schema revision "
            f"{current!r}, this sessionflow needs {head!r}: {UPGRADE_HINT}"
        )

    def upgrade(self) -> str:
        """Apply pending migrations with engines of their own; returns the revision."""
        write, read = self.create()
        try:
            with _migrating(write) as conn:
                self._check_known(migrate.current_revision(conn))
                migrate.upgrade(conn)
                revision = migrate.current_revision(conn)
        except DBAPIError as exc:
            raise StoreError(
                f"cannot upgrade the session store at {self.config.masked_url}: "
                f"{_reason(exc)}. Is the database running and the URL right?"
            ) from None
        finally:
            for engine in {write, read}:
                engine.dispose()
        assert revision is not None
        return revision

    def _check_known(self, revision: str | None) -> None:
        if not migrate.is_known(revision):
            raise StoreError(
                f"the session store at {self.config.masked_url} is at schema revision "
                f"{revision!r}, which this sessionflow does not know (it knows up to "
                f"{migrate.head_revision()!r}): a newer sessionflow migrated it; upgrade "
                "sessionflow in this process's environment"
            )

    def revision(self) -> str | None:
        write, read = self.create()
        try:
            with read.connect() as conn:
                return migrate.current_revision(conn)
        except DBAPIError as exc:
            raise StoreError(
                f"cannot reach the session store at {self.config.masked_url}: {_reason(exc)}"
            ) from None
        finally:
            for engine in {write, read}:
                engine.dispose()

    def dispose(self) -> None:
        with self._lock:
            for engine in {self._write, self._read} - {None}:
                assert engine is not None
                engine.dispose()
            self._write = self._read = None
            self._pid, self._ready = None, False

    # -- connections ----------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE)."""
        engine = self.get()[0]
        with translated("write"), engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        engine = self.get()[1]
        with translated("read"), engine.connect() as conn:
            yield conn

    @contextmanager
    def single(self) -> Iterator[Connection]:
        """A connection in autocommit mode for one statement that is a transaction of its
        own: one round trip, with no BEGIN or COMMIT around it."""
        engine = self.get()[0]
        # SQLite connections already run in the driver's autocommit mode (BEGIN comes from
        # the "begin" listener): skipping that BEGIN is enough, and cheaper than switching
        # the isolation level, which SQLAlchemy resets with a PRAGMA at every checkin.
        options = {"sessionflow_single": True} if self.config.is_sqlite else _AUTOCOMMIT
        with translated("write"), engine.connect().execution_options(**options) as conn:
            yield conn


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn database errors into sessionflow errors callers can catch."""
    try:
        yield
    except SessionFlowError:
        raise
    except DataError as exc:
        raise InvalidArgument(
            f"the session store refused a value: {_reason(exc)}; nothing was written"
        ) from None
    except IntegrityError as exc:
        raise StoreRefused(f"session store {what} refused: {_reason(exc)}") from None
    except DBAPIError as exc:
        message = _reason(exc)
        if "no such table" in message or "does not exist" in message:
            raise StoreError(
                f"the session store has no sessionflow schema ({message}): {UPGRADE_HINT}"
            ) from None
        raise StoreError(f"session store {what} failed: {message}") from None
    except (OverflowError, RecursionError) as exc:
        raise InvalidArgument(f"a value is too large for the session store: {exc}") from None
    except SQLAlchemyError as exc:
        raise StoreError(f"session store {what} failed: {type(exc).__name__}") from None


def _reason(exc: DBAPIError) -> str:
    """The driver's own message: no SQL text, no parameters (they may hold user data)."""
    orig = exc.orig
    text = str(orig).strip().splitlines()[0] if orig is not None and str(orig).strip() else ""
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


IDLE_PING = 5.0  # seconds a pooled connection may rest before it is tested on checkout


def _ping_when_idle(engine: Engine) -> None:
    """Test a pooled connection on checkout only if it rested a while.

    ``pool_pre_ping`` would cost a round trip before every statement; a connection in
    steady use is known to be alive. One that broke anyway (the server restarted) fails
    its statement, SQLAlchemy invalidates the pool, and the next call reconnects.
    """

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get("sessionflow_used")
        if last is not None and time.monotonic() - last < IDLE_PING:
            return
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_conn.rollback()  # leave no transaction open behind the ping
        except Exception as exc:
            raise DisconnectionError(f"stale connection: {type(exc).__name__}") from exc

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["sessionflow_used"] = time.monotonic()


BUSY_TIMEOUT = 30.0  # seconds a SQLite statement waits for another process's lock


def use_wal(cursor: Any, timeout: float = BUSY_TIMEOUT) -> None:
    """Switch the database to WAL, retrying while another process switches it too.

    Two processes that switch a fresh database at the same moment deadlock on the lock
    upgrade, and SQLite answers one of them "database is locked" at once instead of
    calling the busy handler (seen as a worker failing to start next to another). The
    switch is idempotent, so waiting and asking again is safe.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A transaction to check or migrate the schema in. On SQLite foreign keys are off
    meanwhile (the pragma is a no-op inside a transaction, so it is set before): Alembic
    rebuilds a table by copy, DROP and rename, and the DROP of a parent table cascades
    to its children's rows (0002 rebuilds ``sf_sessions``, which emptied
    ``sf_session_tasks``)."""
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection if engine.dialect.name == "sqlite" else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                yield conn
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys = ON")


def _sqlite_engine(url: str, options: dict[str, Any], *, immediate: bool) -> Engine:
    engine = create_engine(url, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event emits BEGIN below
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        use_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("sessionflow_single"):
            return  # one statement, its own implicit transaction
        # Writers take the lock up front so two writers never deadlock on upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine

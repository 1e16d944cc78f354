"""A broker that needs no server: kombu's filesystem transport, made safe for several processes.

kombu's filesystem transport writes each message straight into its final file,
so a consumer polling the folder can pick the file up while it is still empty
and fail with ``JSONDecodeError: Expecting value`` (the message is lost; kombu
issue #1551). Here every message is written under a name no consumer looks at
and then renamed into place, which is atomic on one filesystem.

kombu reads a queue's files in name order. Its names start with the time in
milliseconds and then a random uuid, so messages one producer sent within the same
millisecond came out in random order. Here a name starts with the monotonic clock in
nanoseconds and a per-process sequence number: each producer's messages are consumed
in the order it sent them, as Redis and RabbitMQ do.

Binding a queue to an exchange: kombu creates the exchange's table file empty and
fills it afterwards, without a lock in between, so two processes starting together
(two workers binding their queues) could read it empty (``JSONDecodeError``, the
worker exits) or write over each other (a binding lost: messages to that queue were
dropped). Here the table file is created with its content in one step, and changed
only under an exclusive lock.

Results: Celery's ``file://`` backend also writes a result straight into its file, so a
caller polling it could read half a document (``DecodeError``), and two writers of one
result (a session's end and the pool refusing the task) could leave two documents in
it for good. :class:`FileBackend` writes under another name and renames into place.

For demos and tests on one machine (``app.conf.update(fsbroker.settings(folder))``,
``app.conf.result_backend = fsbroker.result_backend(folder)``).
Production uses Redis or RabbitMQ.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import uuid
from pathlib import Path
from time import monotonic_ns
from typing import Any

from celery.backends.filesystem import FilesystemBackend
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.transport.filesystem import LOCK_EX, exchange_queue_t, lock, unlock
from kombu.utils.json import dumps, loads

_SEQUENCE = itertools.count()
_SEQUENCE_LOCK = threading.Lock()


def message_name(queue: str) -> str:
    """The file name of a new message of ``queue``: later names sort after earlier ones
    of this process (kombu takes the first name of a queue in sorted order)."""
    with _SEQUENCE_LOCK:
        stamp, seq = monotonic_ns(), next(_SEQUENCE)
    return f"{stamp:020d}_{seq:012d}_{os.getpid()}_{uuid.uuid4().hex}.{queue}.msg"


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear in the folder complete and in order."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = message_name(queue)
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".partial-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as file:
                file.write(dumps(payload).encode())
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"cannot add message file {final!r}") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        path: Path = self._exchange_file(exchange)  # type: ignore[no-untyped-call]
        self.control_folder.mkdir(exist_ok=True)
        entry = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            if _create_complete(path, dumps([entry])):
                return
            with open(path, "rb+", buffering=0) as file:
                lock(file, LOCK_EX)
                try:
                    table = [exchange_queue_t(*row) for row in loads(file.read().decode())]
                    if entry not in table:
                        table.insert(0, entry)
                        file.seek(0)
                        file.write(dumps(table).encode())
                        file.truncate()
                finally:
                    unlock(file)
        except OSError as exc:
            raise ChannelError(f"cannot bind {queue!r} to exchange {exchange!r}") from exc


def _create_complete(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` in one step; False if it exists already."""
    partial = path.with_name(f".partial-{uuid.uuid4()}")
    try:
        with open(partial, "wb") as file:
            file.write(text.encode())
        try:
            os.link(partial, path)  # fails if it exists: never replaces another's table
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


class Transport(filesystem.Transport):
    """kombu's filesystem transport with atomic message files."""

    Channel = Channel


class FileBackend(FilesystemBackend):  # type: ignore[misc]
    """Celery's ``file://`` result backend, each result written whole (see above)."""

    def set(self, key: bytes, value: Any) -> None:
        final = self._filename(key)
        partial = self._filename(b".partial-%s-%s" % (uuid.uuid4().hex.encode(), key))
        value = value.encode() if isinstance(value, str) else value
        try:
            with self.open(partial, "wb") as file:
                file.write(value)
            os.replace(partial, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)


def result_backend(folder: Path | str) -> str:
    """The ``result_backend`` setting for results kept as files under ``folder``."""
    return f"{FileBackend.__module__}:FileBackend+file://{Path(folder).resolve()}"


def settings(folder: Path, polling_interval: float = 0.05) -> dict[str, Any]:
    """Celery settings for a broker whose messages are files under ``folder``."""
    messages, control = folder / "broker", folder / "broker-control"
    messages.mkdir(parents=True, exist_ok=True)
    control.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": "filesystem://localhost/",
        "broker_transport": Transport,
        "broker_transport_options": {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "control_folder": str(control),
            "store_processed": False,
            "polling_interval": polling_interval,  # kombu's default of 1 s adds 1 s per hop
        },
    }

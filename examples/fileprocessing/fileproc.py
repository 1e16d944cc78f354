"""The Celery app of the file-processing example: what your own project's module looks like.

Temporal's file-processing sample, with sessionflow: ``download`` saves a file on
the disk of the worker that runs it, ``process`` reads that local file and writes
the result next to it, ``upload`` sends the result on. The three only work if
they run on the same worker, which is what a session guarantees.

Workers start with ``celery -A fileproc worker -n w1@%h --max-sessions 2``.
Settings come from environment variables; without any, everything is embedded
(no servers): kombu's filesystem broker (``sessionflow.fsbroker``), a ``file://``
result backend (``fsbroker.result_backend``) and a SQLite session store, all under
``$FILEPROC_DATA`` (default ``./data``).

- ``FILEPROC_DATA``: folder for the embedded broker, results, store and worker disks
- ``FILEPROC_BROKER_URL``: e.g. ``redis://127.0.0.1:6379/0`` instead of the filesystem
- ``FILEPROC_RESULT_BACKEND``: e.g. ``redis://127.0.0.1:6379/1`` instead of ``file://``
- ``FILEPROC_DATABASE_URL``: e.g. ``postgresql+psycopg://127.0.0.1/test`` instead of
  SQLite (run ``sessionflow db upgrade --url URL`` once first)
- ``FILEPROC_QUEUE_PREFIX``: prefix of sessionflow's queue names (default ``fileproc``)
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from celery import Celery

from sessionflow import SessionFlow, current_session, fsbroker

DATA = Path(os.environ.get("FILEPROC_DATA") or Path(__file__).resolve().parent / "data")


app = Celery("fileproc")
if os.environ.get("FILEPROC_BROKER_URL"):
    app.conf.broker_url = os.environ["FILEPROC_BROKER_URL"]
else:
    app.conf.update(fsbroker.settings(DATA))  # no server: messages are files under DATA
if not os.environ.get("FILEPROC_RESULT_BACKEND"):
    (DATA / "results").mkdir(parents=True, exist_ok=True)
app.conf.update(
    result_backend=(
        os.environ.get("FILEPROC_RESULT_BACKEND") or fsbroker.result_backend(DATA / "results")
    ),
    broker_connection_retry_on_startup=True,
    sessionflow_database_url=(
        os.environ.get("FILEPROC_DATABASE_URL") or f"sqlite:///{DATA / 'sessionflow.db'}"
    ),
    # Its own queue names, so workers of other apps on the same broker never admit its sessions.
    sessionflow_queue_prefix=os.environ.get("FILEPROC_QUEUE_PREFIX") or "fileproc",
)
flow = SessionFlow(app)  # the one line sessionflow needs: adds --max-sessions and the bootsteps


def local_disk(nodename: str) -> Path:
    """This worker's own scratch folder: stands in for a disk only that machine has."""
    folder = DATA / "workers" / re.sub(r"[^A-Za-z0-9_.-]", "_", nodename)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _local_file(path: str, nodename: str) -> Path:
    """``path`` if it is on this worker's disk; fails loudly if the session was not pinned."""
    file = Path(path)
    if file.parent != local_disk(nodename) or not file.exists():
        raise FileNotFoundError(
            f"{path} is not on the local disk of {nodename}: "
            "the steps of this file did not run on one worker"
        )
    return file


def _step(record: dict[str, Any], step: str, nodename: str, **facts: Any) -> dict[str, Any]:
    """Add who did ``step`` to the record that travels from task to task."""
    session = current_session()
    entry = {"step": step, "worker": nodename, "session": session.id if session else None}
    return {**record, "steps": [*record.get("steps", []), {**entry, **facts}]}


@app.task(bind=True)
def download(self: Any, url: str, name: str) -> dict[str, Any]:
    """Fetch ``url`` onto this worker's local disk."""
    nodename = self.request.hostname
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    session = current_session()
    target = local_disk(nodename) / f"{session.id if session else 'nosession'}-{name}"
    target.write_bytes(data)
    record = {"name": name, "path": str(target)}
    return _step(record, "download", nodename, bytes=len(data))


@app.task(bind=True)
def process(self: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Read the downloaded file from the local disk and write the processed file beside it."""
    nodename = self.request.hostname
    source = _local_file(record["path"], nodename)
    data = source.read_bytes()
    time.sleep(0.3)  # the "transcoding"; long enough that sessions overlap
    target = source.with_name(source.name + ".processed")
    target.write_bytes(data.upper())
    source.unlink()
    record = {**record, "path": str(target)}
    return _step(record, "process", nodename, found=str(source))


@app.task(bind=True)
def upload(self: Any, record: dict[str, Any], url: str) -> dict[str, Any]:
    """Send the processed file from the local disk to ``url`` (HTTP PUT)."""
    nodename = self.request.hostname
    source = _local_file(record["path"], nodename)
    request = urllib.request.Request(url, data=source.read_bytes(), method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        status = response.status
    source.unlink()
    return _step(record, "upload", nodename, found=str(source), status=status)

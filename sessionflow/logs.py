"""Logs that name the session, and the worker banner's sessionflow section.

In a worker, every log record gets a ``session_id`` attribute: the id of the
session task running in that thread, ``""`` elsewhere. So ``%(session_id)s`` can
be used in ``worker_task_log_format`` (lines written through ``get_task_logger``)
and in ``worker_log_format``::

    app.conf.worker_task_log_format = (
        "[%(asctime)s: %(levelname)s/%(processName)s] "
        "%(task_name)s[%(task_id)s] session=%(session_id)s: %(message)s"
    )
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from .runtime import current_run

ATTRIBUTE = "session_id"


def install_record_factory() -> None:
    """Give every log record of this process a ``session_id`` (idempotent).

    Installed in the worker main process before the pool forks (children inherit
    it) and again in each pool process (``worker_process_init``).
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_sessionflow", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        run = current_run()
        setattr(record, ATTRIBUTE, run.session_id if run is not None else "")
        return record

    factory._sessionflow = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def banner_section(lines: Sequence[tuple[str, str]]) -> str:
    """A ``[sessionflow]`` section in the style of Celery's ``[config]`` section."""
    width = max(len(name) for name, _ in lines) + 1
    body = "\n".join(f".> {name + ':':<{width}} {value}" for name, value in lines)
    return f"\n[sessionflow]\n{body}\n"


def extend_banner(worker: Any, lines: Callable[[], Sequence[tuple[str, str]]]) -> None:
    """Append the section to the banner ``celery worker`` prints at start.

    ``startup_info`` exists on the ``celery worker`` program only (not on embedded
    test workers); Celery's lines stay as they are.
    """
    startup_info = getattr(worker, "startup_info", None)
    if startup_info is None or getattr(startup_info, "_sessionflow", False):
        return

    def with_sessions(*args: Any, **kwargs: Any) -> str:
        text = str(startup_info(*args, **kwargs))
        # With the ASCII art, Celery indents the lines below it by 16 columns.
        indent = " " * 16 if kwargs.get("artlines", args[0] if args else True) else ""
        section = banner_section(lines()).splitlines()
        return text + "".join(f"{indent}{line}\n" if line else "\n" for line in section)

    with_sessions._sessionflow = True  # type: ignore[attr-defined]
    worker.startup_info = with_sessions


__all__ = ["ATTRIBUTE", "banner_section", "extend_banner", "install_record_factory"]

"""Hooks around session task executions, in the process that runs the task."""

from __future__ import annotations

from typing import Any

from .runtime import TaskRun


class Middleware:
    """Base of session task middleware: subclasses override the hooks they need."""

    def before_body(self, run: TaskRun) -> None:
        """The session is open and the body is about to run."""

    def after_body(self, run: TaskRun, retval: Any) -> None:
        """The body returned ``retval``; its result is not stored yet."""

    def after_task(self, run: TaskRun, state: str) -> None:
        """The execution ended in Celery ``state`` and its result is stored."""

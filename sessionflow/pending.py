"""Sessions asked for without waiting: ``flow.request_session(...)`` and its handle.

A web view asks for a session and answers at once ("202 Accepted" with the id); a
later request polls ``flow.get_session(id).info.state`` or waits with
``handle.wait()``. Asking costs what sending a task costs: the request (carrying
the whole session) is published, and the pending row is written by the same
background thread that registers tasks, so ``get_session(id)`` finds it a few
milliseconds later, in any process. A session nobody admits within its
``creation_timeout`` becomes failed (``creation_timeout``), by whoever waits for it
or else by the sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeout

from . import limits
from .enums import Reason, SessionStatus
from .errors import (
    SessionCreationTimeout,
    SessionStillPending,
    SessionUnplaceable,
    ended_error,
)
from .records import NewSession
from .session import Session

if TYPE_CHECKING:
    from .flow import SessionFlow

_POLL_START, _POLL_MAX = 0.002, 0.05


class SessionRequest:
    """A session asked for: its ``id`` at once, the :class:`Session` when a worker took it."""

    def __init__(self, flow: SessionFlow, new: NewSession, reply_id: str | None) -> None:
        self._flow = flow
        self._new = new
        self._reply_id = reply_id
        self.id = new.id

    def __repr__(self) -> str:
        return f"<SessionRequest {self.id}>"

    @property
    def session(self) -> Session:
        """The session, usable at once (``info.state`` is ``pending`` until admitted)."""
        return Session(self._flow, self.id)

    @property
    def deadline(self) -> float:
        """Seconds since the epoch after which no worker may admit it any more."""
        return self._new.created_at.timestamp() + self._new.creation_timeout

    def done(self) -> bool:
        """Whether a worker admitted it (or it failed): ``wait()`` would not block."""
        found = self._flow.store.statuses([self.id]).get(self.id)
        return found is not None and found[0] is not SessionStatus.PENDING

    def wait(self, timeout: float | None = None) -> Session:
        """Block until a worker admits the session (at most ``timeout`` seconds, by default
        until its ``creation_timeout``) and return it.

        Raises SessionCreationTimeout once its ``creation_timeout`` passed with no worker
        (the session is then failed), SessionStillPending if ``timeout`` ran out first.
        """
        end = self._end(timeout)
        if self._reply_id is not None and not isinstance(self._flow.app.backend, DisabledBackend):
            with contextlib.suppress(CeleryTimeout):
                answer = self._flow.app.AsyncResult(self._reply_id).get(
                    timeout=max(0.0, end - time.time()), interval=0.01, propagate=False
                )
                self._raise_refusal(answer)
        else:
            delay = _POLL_START
            while time.time() < end and not self.done():
                time.sleep(min(delay, max(0.0, end - time.time())))
                delay = min(delay * 2, _POLL_MAX)
        return self._outcome()

    async def wait_async(self, timeout: float | None = None) -> Session:
        """:meth:`wait` for asyncio: polls the store from the loop's default executor, so
        waiting requests cost no thread each."""
        end = self._end(timeout)
        loop = asyncio.get_running_loop()
        delay = _POLL_START
        while time.time() < end:
            if await loop.run_in_executor(None, self.done):
                break
            await asyncio.sleep(min(delay, max(0.0, end - time.time())))
            delay = min(delay * 2, _POLL_MAX)
        return await loop.run_in_executor(None, self._outcome)

    def _end(self, timeout: Any) -> float:
        """When a wait of ``timeout`` seconds (None: until creation_timeout) gives up."""
        wait = limits.seconds("timeout", timeout, optional=True, zero=True)
        return self.deadline if wait is None else min(self.deadline, time.time() + wait)

    def _raise_refusal(self, answer: object) -> None:
        """A placed request's answer says why no worker took it: raise that, as
        ``create_session`` would have."""
        if not isinstance(answer, dict):
            return
        if answer.get("unplaceable"):
            raise SessionUnplaceable(str(answer["unplaceable"]))
        if answer.get("timeout"):
            raise SessionCreationTimeout(str(answer["timeout"]))

    def _outcome(self) -> Session:
        found = self._flow.store.statuses([self.id]).get(self.id)
        if found is not None and found[0] is SessionStatus.OPEN:
            self._flow.ensure_watching()
            return self.session
        if found is None or found[0] is SessionStatus.PENDING:
            if time.time() < self.deadline:
                raise SessionStillPending(
                    f"session {self.id} is still waiting for a worker; wait() again, or poll "
                    "flow.get_session(id).info.state"
                )
            if self._flow.store.abandon_new(self._new, Reason.CREATION_TIMEOUT.value):
                raise SessionCreationTimeout(
                    f"no worker admitted session {self.id} within {self._new.creation_timeout} s"
                    ": are workers running with SessionFlow(app), and below their cap?"
                )
            return self._outcome()  # a worker took it at the last moment
        if found[1] == Reason.UNPLACEABLE.value:
            raise SessionUnplaceable(
                f"no live worker could take session {self.id} (its requires/constraints); "
                "see `celery sessions workers` for what each worker offers"
            )
        if found[1] == Reason.CREATION_TIMEOUT.value:
            raise SessionCreationTimeout(
                f"no worker admitted session {self.id} within {self._new.creation_timeout} s"
            )
        raise ended_error(self.id, found[0].value, found[1])

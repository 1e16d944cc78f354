"""Signals of a session's life, as Celery's own (:mod:`celery.signals`) are.

Connect a receiver the Celery way; it gets ``sender`` (the worker's node name) and
keyword arguments::

    from sessionflow.signals import session_closed

    @session_closed.connect
    def on_closed(sender=None, session_id=None, reason=None, **kwargs):
        log.info("%s closed %s: %s", sender, session_id, reason)

Every one of them fires in the **worker main process** (where ``celery worker``
admits and ends sessions), on the thread that made the change: the consumer's
event loop (admission, ``complete()`` told by a client, ``celery sessions
complete``) or sessionflow's ticker thread (timeouts, ends found in the store,
warm shutdown). Keep receivers short; Celery logs and swallows their errors.
None fires in client processes, pool (prefork) processes, or for the sessions of
a worker that died (a sweeper elsewhere fails those: see ``celery sessions list
--state failed``).

Keyword arguments of the session signals: ``session_id``, ``hostname`` (the
worker's node name, also the sender), ``reason`` (None when opened), ``user_id``,
``agent_id``, ``open`` (sessions the worker has open after the change) and ``cap``
(its ``--max-sessions``, as changed by ``celery control sessions_cap``).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

_SESSION_ARGS = {"session_id", "hostname", "reason", "user_id", "agent_id", "open", "cap"}
_ADMISSION_ARGS = {"hostname", "open", "cap"}

#: The worker opened a session: it admitted a new, recreated or moved session, or
#: (restarted under the same node name) resumed one created with ``survive_restart``.
session_opened = Signal(name="session_opened", providing_args=_SESSION_ARGS)

#: A session of this worker closed: ``complete()``, an operator, ``execution_timeout``,
#: ``ttl`` or ``idle_timeout`` (``reason`` says which).
session_closed = Signal(name="session_closed", providing_args=_SESSION_ARGS)

#: A session of this worker failed: ``worker_shutdown`` on a warm shutdown, or an
#: operator's ``celery sessions fail`` (``reason`` says which).
session_failed = Signal(name="session_failed", providing_args=_SESSION_ARGS)

#: The worker stopped taking creation requests: it reached its cap (or the store
#: failed during an admission, or it is shutting down). Arguments: ``hostname``,
#: ``open``, ``cap``.
session_admission_paused = Signal(name="session_admission_paused", providing_args=_ADMISSION_ARGS)

#: The worker takes creation requests again after a pause (a session ended, or its
#: cap was raised). Not sent when a worker starts. Arguments as for the pause.
session_admission_resumed = Signal(name="session_admission_resumed", providing_args=_ADMISSION_ARGS)

__all__ = [
    "session_admission_paused",
    "session_admission_resumed",
    "session_closed",
    "session_failed",
    "session_opened",
]

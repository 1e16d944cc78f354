"""Settings: ``sessionflow_*`` keys of ``app.conf``, read once into :class:`Config`."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite:///sessionflow.db"
_QUEUE_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class Config:
    """Validated sessionflow settings of one Celery app."""

    database_url: str = DEFAULT_DATABASE_URL
    max_concurrent_sessions: int = 1000
    auto_migrate: bool = True
    queue_prefix: str = "sessionflow"
    heartbeat_interval: float = 1.0
    admission_poll_interval: float = 0.2
    monitor_interval: float = 0.5
    secret_key: str | None = None
    state_max_value_bytes: int = 1_048_576
    state_max_session_bytes: int = 16_777_216
    history_max_runs: int = 1000

    @property
    def creation_queue(self) -> str:
        """Name of the shared queue that carries session creation requests."""
        return f"{self.queue_prefix}.create"

    def worker_queue(self, nodename: str) -> str:
        """Name of the session queue of the worker called ``nodename``.

        Stable for a nodename, so a restarted worker finds its queue again. Characters
        some transports reject in names (``@`` for the filesystem transport) are
        replaced, with a short digest keeping distinct nodenames apart.
        """
        return f"{self.queue_prefix}.worker.{_safe(nodename)}"

    def worker_creation_queue(self, nodename: str) -> str:
        """Queue of creation requests addressed to one worker (recreate_session)."""
        return f"{self.queue_prefix}.create.{_safe(nodename)}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _safe(nodename: str) -> str:
    safe = _UNSAFE_RE.sub("_", nodename)
    if safe != nodename:
        safe += "-" + hashlib.sha1(nodename.encode()).hexdigest()[:8]
    return safe


_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "database_url": (str, "a SQLAlchemy URL such as 'postgresql+psycopg://host/db'"),
    "max_concurrent_sessions": (int, "a positive whole number"),
    "auto_migrate": (bool, "True or False"),
    "queue_prefix": (str, "letters, digits, '.', '_' or '-'"),
    "heartbeat_interval": ((int, float), "a positive number of seconds"),
    "admission_poll_interval": ((int, float), "a positive number of seconds"),
    "monitor_interval": ((int, float), "a positive number of seconds"),
    "secret_key": (str, "a long random string (used to sign recreate tokens)"),
    "state_max_value_bytes": (int, "a positive number of bytes (one state value as JSON)"),
    "state_max_session_bytes": (int, "a positive number of bytes (all values of one scope)"),
    "history_max_runs": (int, "a positive number of task runs kept per session"),
}


def load_config(conf: Any) -> Config:
    """Read and validate the ``sessionflow_*`` keys of a Celery ``app.conf``."""
    known = {f"sessionflow_{name}" for name in _FIELDS}
    unknown = sorted(k for k in conf if str(k).startswith("sessionflow_") and k not in known)
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {', '.join(unknown)}; "
            f"valid sessionflow settings are {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for name, (kind, hint) in _FIELDS.items():
        value = conf.get(f"sessionflow_{name}")
        if value is None:
            continue
        bad_bool = kind is not bool and isinstance(value, bool)
        if not isinstance(value, kind) or bad_bool:
            raise ConfigurationError(
                f"app.conf.sessionflow_{name} = {value!r} is invalid: expected {hint}"
            )
        values[name] = value
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    if config.max_concurrent_sessions < 1:
        raise ConfigurationError(
            "app.conf.sessionflow_max_concurrent_sessions must be at least 1, "
            f"got {config.max_concurrent_sessions}"
        )
    for name in (
        "heartbeat_interval",
        "admission_poll_interval",
        "monitor_interval",
        "state_max_value_bytes",
        "state_max_session_bytes",
        "history_max_runs",
    ):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(
                f"app.conf.sessionflow_{name} = {value!r}: use a positive, finite number"
            )
    if not _QUEUE_PREFIX_RE.match(config.queue_prefix):
        raise ConfigurationError(
            f"app.conf.sessionflow_queue_prefix = {config.queue_prefix!r}: "
            "use only letters, digits, '.', '_' or '-'"
        )
    if not config.database_url:
        raise ConfigurationError("app.conf.sessionflow_database_url must not be empty")

"""Settings: ``sessionflow_*`` keys of ``app.conf``, read once into :class:`Config`."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite:///sessionflow.db"
SUPPORTED_DIALECTS = ("sqlite", "postgresql")
MIN_SECRET_BYTES = 32
_QUEUE_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.\-]")
_UNSET = object()


@dataclass(frozen=True)
class Config:
    """Validated sessionflow settings of one Celery app.

    Its repr masks the database password and leaves the secret key out.
    """

    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    max_concurrent_sessions: int = 1000
    auto_migrate: bool = True
    queue_prefix: str = "sessionflow"
    heartbeat_interval: float = 1.0
    admission_poll_interval: float = 0.2
    monitor_interval: float = 0.5
    secret_key: str | None = field(default=None, repr=False)
    state_max_value_bytes: int = 1_048_576
    state_max_session_bytes: int = 16_777_216
    history_max_runs: int = 1000
    retention: float | None = 7 * 24 * 3600.0
    flush_interval: float = 0.1

    def __repr__(self) -> str:
        shown = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("database_url", "secret_key")
        }
        parts = [f"database_url={self.masked_url!r}"]
        parts += [f"{k}={v!r}" for k, v in shown.items()]
        parts.append(f"secret_key={'<set>' if self.secret_key else None}")
        return f"Config({', '.join(parts)})"

    @property
    def masked_url(self) -> str:
        """The database URL with its password replaced by ``***``."""
        return mask_url(self.database_url)

    @cached_property
    def dialect(self) -> str:
        return make_url(self.database_url).get_backend_name()

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
        return f"{self.queue_prefix}.worker.{safe_name(nodename)}"

    def worker_creation_queue(self, nodename: str) -> str:
        """Queue of creation requests addressed to one worker (recreate_session)."""
        return f"{self.queue_prefix}.create.{safe_name(nodename)}"

    @cached_property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (unparsable URLs are hidden whole)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return "<unparsable database URL>"


def safe_name(nodename: str) -> str:
    """A node name made safe for queue names: unsafe characters become ``_`` plus a digest."""
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
    "secret_key": (str, f"a long random string of at least {MIN_SECRET_BYTES} bytes"),
    "state_max_value_bytes": (int, "a positive number of bytes (one state value as JSON)"),
    "state_max_session_bytes": (int, "a positive number of bytes (all values of one scope)"),
    "history_max_runs": (int, "a positive number of task runs kept per session"),
    "retention": ((int, float), "seconds to keep ended sessions (0 or more), or None for ever"),
    "flush_interval": ((int, float), "a positive number of seconds (at most 60)"),
}
#: Settings whose ``None`` means something (not "use the default").
_NONE_ALLOWED = {"retention"}


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
        value = conf.get(f"sessionflow_{name}", _UNSET)
        if value is _UNSET or (value is None and name not in _NONE_ALLOWED):
            continue
        if value is None:
            values[name] = None
            continue
        bad_bool = kind is not bool and isinstance(value, bool)
        if not isinstance(value, kind) or bad_bool:
            shown = "<hidden>" if name == "secret_key" else repr(value)
            raise ConfigurationError(
                f"app.conf.sessionflow_{name} = {shown} is invalid: expected {hint}"
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
        "flush_interval",
    ):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(
                f"app.conf.sessionflow_{name} = {value!r}: use a positive, finite number"
            )
    if config.flush_interval > 60:
        raise ConfigurationError(
            f"app.conf.sessionflow_flush_interval = {config.flush_interval!r}: at most 60 s "
            "(it is how much task history a killed worker can lose)"
        )
    if config.retention is not None and (
        not math.isfinite(config.retention) or config.retention < 0
    ):
        raise ConfigurationError(
            f"app.conf.sessionflow_retention = {config.retention!r}: use seconds >= 0, "
            "or None to keep ended sessions for ever"
        )
    if not _QUEUE_PREFIX_RE.match(config.queue_prefix):
        raise ConfigurationError(
            f"app.conf.sessionflow_queue_prefix = {config.queue_prefix!r}: "
            "use only letters, digits, '.', '_' or '-'"
        )
    if config.secret_key is not None and len(config.secret_key.encode()) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"app.conf.sessionflow_secret_key is shorter than {MIN_SECRET_BYTES} bytes: use a "
            "long random string, e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    check_database_url(config.database_url)


def check_database_url(url: str) -> None:
    """Refuse URLs sessionflow cannot serve, before anything connects."""
    if not url:
        raise ConfigurationError("app.conf.sessionflow_database_url must not be empty")
    try:
        dialect = make_url(url).get_backend_name()
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"app.conf.sessionflow_database_url is not a SQLAlchemy URL ({type(exc).__name__}); "
            "use e.g. 'postgresql+psycopg://host/db' or 'sqlite:////abs/path.db'"
        ) from None
    if dialect in ("mysql", "mariadb"):
        raise ConfigurationError(
            f"sessionflow_database_url {mask_url(url)}: MySQL/MariaDB cannot serve the session "
            "store yet (it needs UPDATE ... RETURNING and JSON aggregation, which MySQL lacks); "
            "use PostgreSQL, or SQLite on one machine"
        )
    if dialect not in SUPPORTED_DIALECTS:
        raise ConfigurationError(
            f"sessionflow_database_url {mask_url(url)}: the {dialect!r} database is not "
            f"supported; use one of {', '.join(SUPPORTED_DIALECTS)}"
        )

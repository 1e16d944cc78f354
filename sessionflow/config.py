"""Settings: ``sessionflow_*`` keys of ``app.conf``, read once into :class:`Config`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from . import limits, resources
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

    Its repr masks the database password and leaves the secret key out; it is never
    pickled (``__reduce__`` raises TypeError).
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
    engine_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    # Placement: what each worker of this app offers unless its options say otherwise.
    session_resources: dict[str, int] = field(default_factory=dict, hash=False)
    session_labels: dict[str, str] = field(default_factory=dict, hash=False)
    session_task_limits: dict[str, int] = field(default_factory=dict, hash=False)

    def __repr__(self) -> str:
        # Fields declared repr=False may hold secrets (the key, engine connect_args).
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        parts = [f"database_url={self.masked_url!r}"]
        parts += [f"{k}={v!r}" for k, v in shown.items()]
        parts.append(f"engine_options=<{len(self.engine_options)} keys>")
        parts.append(f"secret_key={'<set>' if self.secret_key else None}")
        return f"Config({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a sessionflow Config holds the secret key and the database password and is "
            "never pickled or copied: read it from app.conf in the other process "
            "(SessionFlow(app).config)"
        )

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


def _shown(name: str, value: Any) -> str:
    """A wrong setting's value for an error message, never a secret."""
    if name == "secret_key":
        return "<hidden>"
    if name == "database_url" and isinstance(value, (str, bytes)):
        return mask_url(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return repr(value)


_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.IGNORECASE)
_MASK = "MASKEDBYSESSIONFLOW"  # letters only: rendered as is, then shown as ***


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: the password, and query parameters
    that may hold one (``?password=``, ``sslpassword``, tokens, keys). Unparsable URLs are
    hidden whole."""
    try:
        parsed = make_url(url)
        if parsed.host and "@" in parsed.host:  # an unescaped "@" in the password
            parsed = parsed.set(password=_MASK, host=parsed.host.rsplit("@", 1)[1])
        query = {
            name: _MASK if _SECRET_PARAM.search(name) else value
            for name, value in parsed.query.items()
        }
        shown = parsed.set(query=query).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return "<unparsable database URL>"
    return shown.replace(_MASK, "***")


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
    "engine_options": (dict, "a dict of keyword arguments for sqlalchemy.create_engine"),
    "session_resources": (dict, "a dict of resource name -> capacity, e.g. {'gpu': 2}"),
    "session_labels": (dict, "a dict of label -> string, e.g. {'zone': 'eu'}"),
    "session_task_limits": (dict, "a dict of task name -> most running at once per worker"),
}

#: Placement settings, checked and made canonical by :mod:`sessionflow.resources`.
_PLACEMENT: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "session_resources": resources.worker_resources,
    "session_labels": resources.worker_labels,
    "session_task_limits": resources.task_limits,
}

#: Settings whose ``None`` means something (not "use the default").
_NONE_ALLOWED = {"retention"}


def load_config(conf: Any, namespace: str | None = None) -> Config:
    """Read and validate the ``sessionflow_*`` keys of a Celery ``app.conf``.

    Keys may come through a Celery namespace (Django's ``CELERY_SESSIONFLOW_…``); an
    unknown key is refused in whatever form it was written, and every error names
    the key as the user wrote it.
    """
    written: dict[str, str] = {}
    unknown = []
    prefixes = ["sessionflow_"] + ([f"{namespace}_SESSIONFLOW_"] if namespace else [])
    for key in conf:
        text = str(key)
        prefix = next((p for p in prefixes if text.startswith(p)), None)
        if prefix is None:
            continue
        name = text[len(prefix) :].lower()
        if name in _FIELDS:
            written.setdefault(name, str(key))
        else:
            unknown.append(str(key))
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {', '.join(sorted(unknown))}; valid sessionflow settings "
            f"are {', '.join(sorted(f'sessionflow_{n}' for n in _FIELDS))} (with your Celery "
            "namespace prefix, if you use one)"
        )

    def label(name: str) -> str:
        return written.get(name) or f"app.conf.sessionflow_{name}"

    values: dict[str, Any] = {}
    for name, (kind, hint) in _FIELDS.items():
        value = conf.get(f"sessionflow_{name}", _UNSET)
        if value is _UNSET or (value is None and name not in _NONE_ALLOWED):
            continue
        if name == "database_url" and isinstance(value, URL):
            value = value.render_as_string(hide_password=False)
        if value is None:
            values[name] = None
            continue
        bad_bool = kind is not bool and isinstance(value, bool)
        if not isinstance(value, kind) or bad_bool:
            shown = _shown(name, value)
            raise ConfigurationError(f"{label(name)} = {shown} is invalid: expected {hint}")
        values[name] = value
    if "engine_options" in values:
        bad = [k for k in values["engine_options"] if not isinstance(k, str)]
        if bad:
            raise ConfigurationError(f"{label('engine_options')}: keys must be strings")
        values["engine_options"] = dict(values["engine_options"])
    for name, parse in _PLACEMENT.items():
        if name in values:
            values[name] = parse(values[name], label(name))
    config = Config(**values)
    _check(config, label)
    return config


def _check(config: Config, label: Callable[[str], str] = lambda n: f"sessionflow_{n}") -> None:
    if not 1 <= config.max_concurrent_sessions <= limits.MAX_CAP:
        raise ConfigurationError(
            f"{label('max_concurrent_sessions')} must be at least 1 and at most "
            f"{limits.MAX_CAP}, got {limits.shown(config.max_concurrent_sessions)}"
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
        most = limits.MAX_INT if isinstance(getattr(Config, name), int) else limits.MAX_SECONDS
        if not limits.finite(value) or not 0 < value <= most:
            raise ConfigurationError(
                f"{label(name)} = {limits.shown(value)}: use a positive, finite number "
                f"(at most {most})"
            )
    if config.flush_interval > 60:
        raise ConfigurationError(
            f"{label('flush_interval')} = {config.flush_interval!r}: at most 60 s "
            "(it is how much task history a killed worker can lose)"
        )
    retention = config.retention
    if retention is not None and (
        not limits.finite(retention) or not 0 <= retention <= limits.MAX_SECONDS
    ):
        raise ConfigurationError(
            f"{label('retention')} = {limits.shown(retention)}: use seconds >= 0 (at most "
            f"{limits.MAX_SECONDS}), or None to keep ended sessions for ever"
        )
    if not _QUEUE_PREFIX_RE.match(config.queue_prefix):
        raise ConfigurationError(
            f"{label('queue_prefix')} = {config.queue_prefix!r}: "
            "use only letters, digits, '.', '_' or '-'"
        )
    if config.secret_key is not None and len(config.secret_key.encode()) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"{label('secret_key')} is shorter than {MIN_SECRET_BYTES} bytes: use a "
            "long random string, e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    check_database_url(config.database_url, label("database_url"))


def check_database_url(url: str, key: str = "sessionflow_database_url") -> None:
    """Refuse URLs sessionflow cannot serve, before anything connects."""
    if not url:
        raise ConfigurationError(f"{key} must not be empty")
    try:
        dialect = make_url(url).get_backend_name()
    except (ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"{key} is not a SQLAlchemy URL ({type(exc).__name__}); "
            "use e.g. 'postgresql+psycopg://host/db' or 'sqlite:////abs/path.db'"
        ) from None
    if dialect in ("mysql", "mariadb"):
        raise ConfigurationError(
            f"{key} {mask_url(url)}: MySQL/MariaDB cannot serve the session "
            "store yet (it needs UPDATE ... RETURNING and JSON aggregation, which MySQL lacks); "
            "use PostgreSQL, or SQLite on one machine"
        )
    if dialect not in SUPPORTED_DIALECTS:
        raise ConfigurationError(
            f"{key} {mask_url(url)}: the {dialect!r} database is not "
            f"supported; use one of {', '.join(SUPPORTED_DIALECTS)}"
        )

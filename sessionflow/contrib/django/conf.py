"""The Django app's settings: the ``SESSIONFLOW`` dict, the Celery app, the store's URL.

``SESSIONFLOW = {"DATABASE": "default", "MAX_CONCURRENT_SESSIONS": 4}`` in
settings.py: every key is a sessionflow setting without its prefix, upper-cased
(``DATABASE_URL``, ``QUEUE_PREFIX`` …), plus the keys of this app:

- ``DATABASE``: an alias of ``DATABASES`` whose database also holds the store
  (PostgreSQL or SQLite; a MySQL/MariaDB entry is refused with the reason);
- ``CELERY_APP``: the Celery app as ``"proj.celery:app"``, when it is not the current
  app (Celery's Django guide imports it in ``proj/__init__.py``, which makes it so);
- ``MIGRATE``: ``False`` to leave the store's schema to ``manage.py sessionflow db
  upgrade`` instead of ``manage.py migrate``.

The same settings may come through Celery's namespace instead
(``CELERY_SESSIONFLOW_MAX_CONCURRENT_SESSIONS = 4`` with ``namespace="CELERY"``);
values in ``SESSIONFLOW`` win.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

from celery import Celery
from sqlalchemy.engine import URL

from ...config import Config, load_config
from ...errors import ConfigurationError
from ...flow import SessionFlow

SETTING = "SESSIONFLOW"
#: Keys of ``SESSIONFLOW`` that belong to this app rather than to sessionflow's settings.
APP_KEYS = ("DATABASE", "CELERY_APP", "MIGRATE")
#: Django database options that are no connection parameters of libpq.
_DJANGO_ONLY_OPTIONS = {
    "isolation_level",
    "server_side_binding",
    "pool",
    "assume_role",
    "cursor_factory",
}
_APPLIED = "_sessionflow_django_settings"  # marks a Celery app setup() configured
#: The app setup() configured: Celery's current app is per thread, and a request may be
#: served by another thread than the one that imported the project.
_project_app: Celery | None = None


def key_label(key: str) -> str:
    """A key of the ``SESSIONFLOW`` dict as the user wrote it in settings.py."""
    return f'{SETTING}["{key}"]'


def store_keys() -> tuple[str, ...]:
    """The sessionflow settings, as keys of the ``SESSIONFLOW`` dict."""
    return tuple(f.name.upper() for f in dataclasses.fields(Config))


def user_settings() -> dict[str, Any]:
    """The ``SESSIONFLOW`` dict of Django's settings (empty when not set)."""
    from django.conf import settings

    value = getattr(settings, SETTING, None)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"settings.{SETTING} must be a dict such as {{'DATABASE': 'default'}}, "
            f"got {type(value).__name__}"
        )
    return dict(value)


def unknown_keys(values: Mapping[Any, Any]) -> list[tuple[str, str]]:
    """``(key, hint)`` for each key of ``values`` that means nothing to sessionflow."""
    known = (*store_keys(), *APP_KEYS)
    found = []
    for key in values:
        if key in known:
            continue
        shown = str(key)
        close = difflib.get_close_matches(shown.upper(), known, n=1)
        if close:
            hint = f"did you mean {key_label(close[0])}?"
        else:
            hint = f"valid keys are {', '.join(sorted(known))}"
        found.append((shown, hint))
    return found


def check_values(values: Mapping[str, Any]) -> None:
    """Refuse unknown keys, and a store named twice (``DATABASE`` and ``DATABASE_URL``)."""
    unknown = unknown_keys(values)
    if unknown:
        key, hint = unknown[0]
        others = "".join(f", {key_label(k)}" for k, _ in unknown[1:])
        raise ConfigurationError(f"unknown setting {key_label(key)}{others}: {hint}")
    if "DATABASE" in values and "DATABASE_URL" in values:
        raise ConfigurationError(
            f"{key_label('DATABASE')} and {key_label('DATABASE_URL')} both name the session "
            "store: keep one"
        )
    migrate = values.get("MIGRATE", True)
    if not isinstance(migrate, bool):
        raise ConfigurationError(f"{key_label('MIGRATE')} must be True or False, got {migrate!r}")


def celery_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sessionflow_*`` keys that ``SESSIONFLOW`` gives the Celery app."""
    check_values(values)
    conf = {f"sessionflow_{key.lower()}": v for key, v in values.items() if key in store_keys()}
    alias = values.get("DATABASE")
    if alias is not None:
        conf["sessionflow_database_url"] = database_url(alias)
    return conf


# -- the store in an entry of DATABASES ------------------------------------------------


def database_url(alias: Any) -> str:
    """The SQLAlchemy URL of the ``DATABASES`` entry ``alias`` (its test database while
    Django's test runner or pytest-django has one)."""
    from django.conf import settings

    label = key_label("DATABASE")
    databases = getattr(settings, "DATABASES", {}) or {}
    if not isinstance(alias, str) or alias not in databases:
        raise ConfigurationError(
            f"{label} = {alias!r} is not an entry of DATABASES "
            f"(it has {', '.join(map(repr, databases)) or 'none'})"
        )
    entry = dict(databases[alias])
    kind = database_kind(alias, entry)
    if kind != "mysql":  # the live settings (test database names) without loading MySQLdb
        from django.db import connections

        entry = dict(connections[alias].settings_dict)
    return url_for_entry(alias, entry, kind)


def database_kind(alias: str, entry: Mapping[str, Any]) -> str:
    """``postgresql``, ``sqlite``, ``mysql`` or the vendor Django names for the entry."""
    engine = str(entry.get("ENGINE") or "").lower()
    for kind, words in (
        ("postgresql", ("postgres", "postgis")),
        ("sqlite", ("sqlite", "spatialite")),
        ("mysql", ("mysql", "mariadb")),
        ("oracle", ("oracle",)),
    ):
        if any(word in engine for word in words):
            return kind
    from django.db import connections

    try:
        return str(connections[alias].vendor)
    except Exception as exc:
        raise ConfigurationError(
            f"DATABASES[{alias!r}] (ENGINE {entry.get('ENGINE')!r}) cannot be loaded: {exc}"
        ) from None


def url_for_entry(alias: str, entry: Mapping[str, Any], kind: str | None = None) -> str:
    """The SQLAlchemy URL of one ``DATABASES`` entry; MySQL and others are refused."""
    kind = kind or database_kind(alias, entry)
    label = f"{key_label('DATABASE')} = {alias!r}"
    if kind == "mysql":
        raise ConfigurationError(
            f"{label} is a MySQL/MariaDB database ({entry.get('ENGINE')}): sessionflow cannot "
            "keep its session store there (the store needs UPDATE ... RETURNING and JSON "
            "aggregation, which MySQL and MariaDB lack). Point DATABASE at a PostgreSQL or "
            "SQLite entry of DATABASES, or set DATABASE_URL to a PostgreSQL database."
        )
    if kind == "sqlite":
        return _sqlite_url(label, str(entry.get("NAME") or ""))
    if kind == "postgresql":
        return _postgres_url(entry)
    raise ConfigurationError(
        f"{label} is a {kind} database: the session store needs PostgreSQL or SQLite"
    )


def _sqlite_url(label: str, name: str) -> str:
    if not name:
        raise ConfigurationError(f"{label}: the SQLite entry has no NAME")
    if name == ":memory:":
        raise ConfigurationError(
            f"{label} is a private in-memory SQLite database that no worker can see: "
            "give it a file NAME"
        )
    if name.startswith("file:"):  # a URI, e.g. Django's shared in-memory test database
        joiner = "&" if "?" in name else "?"
        return f"sqlite:///{name}{joiner}uri=true"
    return URL.create("sqlite", database=os.path.abspath(name)).render_as_string(
        hide_password=False
    )


def _postgres_url(entry: Mapping[str, Any]) -> str:
    options = entry.get("OPTIONS") or {}
    query = {
        str(key): str(value)
        for key, value in options.items()
        if key not in _DJANGO_ONLY_OPTIONS and isinstance(value, (str, int, float))
    }
    port = entry.get("PORT")
    return URL.create(
        f"postgresql+{_postgres_driver()}",
        username=entry.get("USER") or None,
        password=entry.get("PASSWORD") or None,
        host=entry.get("HOST") or None,
        port=int(port) if port else None,
        database=entry.get("NAME") or None,
        query=query,
    ).render_as_string(hide_password=False)


def _postgres_driver() -> str:
    """psycopg (3) when installed, else psycopg2: whichever Django itself can use."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        return "psycopg"
    return "psycopg2"


# -- the Celery app --------------------------------------------------------------------


def celery_app(values: Mapping[str, Any] | None = None) -> Celery:
    """The project's Celery app: ``SESSIONFLOW["CELERY_APP"]``, else Celery's current app."""
    from celery import _state
    from celery.utils.imports import symbol_by_name

    values = user_settings() if values is None else values
    path = values.get("CELERY_APP")
    if path is not None:
        try:
            app = symbol_by_name(path) if isinstance(path, str) else path
        except Exception as exc:
            raise ConfigurationError(
                f"{key_label('CELERY_APP')} = {path!r} cannot be imported: {exc}"
            ) from None
        if not isinstance(app, Celery):
            raise ConfigurationError(
                f"{key_label('CELERY_APP')} = {path!r} is a {type(app).__name__}, not a Celery app"
            )
        return app
    current = _project_app or getattr(_state._tls, "current_app", None)
    if not isinstance(current, Celery):
        raise ConfigurationError(
            "sessionflow found no Celery app: import yours in your project's __init__.py as "
            "Celery's Django guide does (from .celery import app as celery_app), or set "
            f"{key_label('CELERY_APP')} = 'proj.celery:app'"
        )
    return current


def setup(app: Celery | None = None) -> SessionFlow:
    """Give ``app`` the settings of ``SESSIONFLOW`` and attach sessionflow to it.

    Call it in the module that creates the Celery app (``proj/celery.py``), after
    ``config_from_object``; calling it again re-reads the settings (the test database
    once it exists) as long as nothing has used the store yet.
    """
    global _project_app
    if app is not None and not isinstance(app, Celery):
        raise ConfigurationError(
            f"setup() takes the Celery app object (from proj/celery.py), got "
            f"{type(app).__name__}; or call setup() to use SESSIONFLOW['CELERY_APP']"
        )
    values = user_settings()
    app = app if app is not None else celery_app(values)
    app.conf.update(celery_settings(values))
    relabel(lambda: load_config(app.conf, getattr(app, "namespace", None)))  # fail at start
    app.__dict__[_APPLIED] = True
    _project_app = app
    return SessionFlow(app)


def get_flow() -> SessionFlow:
    """The project's :class:`SessionFlow`, configured from Django's settings."""
    app = celery_app()
    flow = SessionFlow.of(app)
    if flow is not None and (app.__dict__.get(_APPLIED) or "config" in flow.__dict__):
        return flow
    return setup(app)


def store_config() -> Config | None:
    """The validated settings of the project's store (None: no store is configured, and
    sessionflow would use its default SQLite file, which it creates by itself)."""
    values = user_settings()
    check_values(values)
    try:
        conf: Any = celery_app(values).conf
    except ConfigurationError:
        conf = {}
    merged = _ConfView(conf, celery_settings(values))
    if merged.get("sessionflow_database_url") is None:
        return None
    config: Config = relabel(lambda: load_config(merged))
    return config


class _ConfView(Mapping[str, Any]):
    """An app's ``conf`` with the ``SESSIONFLOW`` values on top, for validation only."""

    def __init__(self, conf: Any, top: Mapping[str, Any]) -> None:
        self._conf, self._top = conf, top

    def __getitem__(self, key: str) -> Any:
        if key in self._top:
            return self._top[key]
        return self._conf[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._top:
            return self._top[key]
        return self._conf.get(key, default)

    def __iter__(self) -> Any:
        seen = set(self._top)
        yield from self._top
        for key in self._conf:
            if key not in seen:
                yield key

    def __len__(self) -> int:
        return len(set(self._top) | set(self._conf))


_LOWER_KEY = re.compile(r"(?<![A-Za-z_])(?:app\.conf\.)?sessionflow_([a-z_]+)")


def relabel(read: Any) -> Any:
    """Run ``read()``; a ConfigurationError names ``SESSIONFLOW["KEY"]`` for keys of the
    dict (the Celery namespace's own keys are named as written by sessionflow)."""
    try:
        return read()
    except ConfigurationError as exc:
        values = user_settings()

        def name(match: re.Match[str]) -> str:
            key = match.group(1).upper()
            if key in values:
                return key_label(key)
            if key == "DATABASE_URL" and "DATABASE" in values:
                return key_label("DATABASE")
            return match.group(0)

        raise ConfigurationError(_LOWER_KEY.sub(name, str(exc))) from None

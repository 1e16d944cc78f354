"""config.py: defaults, validation of every ``sessionflow_*`` key, worker queue names."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import re
from dataclasses import Field, fields
from typing import Any

import pytest
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st

from sessionflow import ConfigurationError
from sessionflow.config import DEFAULT_DATABASE_URL, Config, load_config

SAFE_QUEUE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def conf(**settings: Any) -> Any:
    app = Celery("cfg", set_as_current=False)
    app.conf.update({f"sessionflow_{k}": v for k, v in settings.items()})
    return app.conf


def test_defaults() -> None:
    config = load_config(conf())
    assert config == Config()
    assert config.database_url == DEFAULT_DATABASE_URL
    assert config.max_concurrent_sessions == 1000
    assert config.auto_migrate is True
    assert config.queue_prefix == "sessionflow"
    assert config.secret_key is None
    assert config.creation_queue == "sessionflow.create"
    assert config.is_sqlite


def test_values_are_read() -> None:
    config = load_config(
        conf(
            database_url="postgresql+psycopg://h/db",
            max_concurrent_sessions=3,
            auto_migrate=False,
            queue_prefix="app-1.sf",
            heartbeat_interval=2,
            admission_poll_interval=0.5,
            secret_key="k" * 32,
        )
    )
    assert config == Config(
        database_url="postgresql+psycopg://h/db",
        max_concurrent_sessions=3,
        auto_migrate=False,
        queue_prefix="app-1.sf",
        heartbeat_interval=2,
        admission_poll_interval=0.5,
        secret_key="k" * 32,
    )
    assert config.creation_queue == "app-1.sf.create"
    assert not config.is_sqlite


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("database_url", 5, "SQLAlchemy URL"),
        ("max_concurrent_sessions", "10", "positive whole number"),
        ("max_concurrent_sessions", 2.0, "positive whole number"),
        ("max_concurrent_sessions", True, "positive whole number"),
        ("auto_migrate", "yes", "True or False"),
        ("auto_migrate", 1, "True or False"),
        ("queue_prefix", b"sf", "letters, digits"),
        ("heartbeat_interval", "1", "positive number of seconds"),
        ("heartbeat_interval", True, "positive number of seconds"),
        ("admission_poll_interval", [0.2], "positive number of seconds"),
        ("admission_poll_interval", False, "positive number of seconds"),
        ("secret_key", b"bytes-key", "long random string"),
    ],
)
def test_wrong_type_names_key_and_expectation(key: str, value: Any, hint: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(conf(**{key: value}))
    message = str(info.value)
    assert f"sessionflow_{key}" in message
    assert hint in message
    if key == "secret_key":  # a key never appears in an error, even a wrong one
        assert repr(value) not in message and "<hidden>" in message
    else:
        assert repr(value) in message


def _wrong_values(field: Field[Any]) -> list[Any]:
    if field.name == "engine_options":
        return ["pool_size=3", [("pool_size", 3)]]
    if isinstance(field.default, bool):
        return ["yes", 1]
    if isinstance(field.default, (int, float)):
        return ["1", True, [1]]
    return [5, b"text"]


ALL_WRONG = [
    pytest.param(field.name, value, id=f"{field.name}-{value!r}")
    for field in fields(Config)
    for value in _wrong_values(field)
]
NUMERIC = [
    f.name for f in fields(Config) if type(f.default) in (int, float) and f.name != "retention"
]
FLOATS = [f.name for f in fields(Config) if type(f.default) is float]


def test_every_field_is_a_setting() -> None:
    assert len(fields(Config)) >= 7
    for field in fields(Config):
        if field.default is dataclasses.MISSING:
            value = {"pool_size": 3} if field.name == "engine_options" else field.default_factory()  # type: ignore[misc]
        else:
            value = "s" * 32 if field.default is None else field.default
        assert getattr(load_config(conf(**{field.name: value})), field.name) == value


@pytest.mark.parametrize(("key", "value"), ALL_WRONG)
def test_every_setting_type_checked(key: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"sessionflow_{key} = .* expected"):
        load_config(conf(**{key: value}))


@pytest.mark.parametrize("key", NUMERIC)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_rejected(key: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"sessionflow_{key}.*(at least 1|positive)"):
        load_config(conf(**{key: value}))


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_interval_rejected(key: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=f"sessionflow_{key}"):
        load_config(conf(**{key: value}))


def test_empty_database_url_rejected() -> None:
    with pytest.raises(ConfigurationError, match="sessionflow_database_url must not be empty"):
        load_config(conf(database_url=""))


@pytest.mark.parametrize("prefix", ["", "sf queue", "sf/q", "sf@host", "sf:q", "sé"])
def test_bad_queue_prefix(prefix: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(conf(queue_prefix=prefix))
    assert "sessionflow_queue_prefix" in str(info.value)
    assert "letters, digits" in str(info.value)


def test_unknown_key_named_with_valid_keys() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(conf(max_sessions=3, databse_url="sqlite://"))
    message = str(info.value)
    assert "sessionflow_databse_url" in message
    assert "sessionflow_max_sessions" in message
    assert "sessionflow_database_url" in message  # the valid keys are listed
    assert "sessionflow_max_concurrent_sessions" in message


def test_unrelated_keys_ignored() -> None:
    config = load_config(conf())
    app = Celery("cfg2", set_as_current=False)
    app.conf.update(task_default_queue="x", other_sessionflow_thing=1)
    assert load_config(app.conf) == config


def test_worker_queue_plain_nodename_kept() -> None:
    assert Config().worker_queue("w1.host") == "sessionflow.worker.w1.host"
    assert Config(queue_prefix="p").worker_queue("a-b_c") == "p.worker.a-b_c"


def test_worker_queue_stable_and_safe() -> None:
    config = Config()
    name = config.worker_queue("w1@host.example")
    assert name == config.worker_queue("w1@host.example")
    assert name == Config().worker_queue("w1@host.example")  # across instances/processes
    assert SAFE_QUEUE.match(name)
    assert name.startswith("sessionflow.worker.w1_host.example")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("w1@host", "w1#host"),
        ("w1@host", "w1_host"),
        ("w1@host", "w1 host"),
        ("wö@h", "wü@h"),
    ],
)
def test_worker_queue_distinct_for_unsafe_variants(a: str, b: str) -> None:
    config = Config()
    assert config.worker_queue(a) != config.worker_queue(b)
    assert SAFE_QUEUE.match(config.worker_queue(a))
    assert SAFE_QUEUE.match(config.worker_queue(b))


@given(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60))
def test_worker_queue_property(a: str, b: str) -> None:
    config = Config()
    qa, qb = config.worker_queue(a), config.worker_queue(b)
    assert SAFE_QUEUE.match(qa)
    assert qa == config.worker_queue(a)
    if a != b:
        assert qa != qb


def test_retention_zero_and_none_allowed() -> None:
    assert load_config(conf()).retention == 7 * 24 * 3600
    assert load_config(conf(retention=0)).retention == 0
    assert load_config(conf(retention=None)).retention is None
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ConfigurationError, match="sessionflow_retention"):
            load_config(conf(retention=bad))


def test_short_secret_key_refused_without_showing_it() -> None:
    with pytest.raises(ConfigurationError, match="shorter than 32 bytes") as info:
        load_config(conf(secret_key="too-short-secret"))
    assert "too-short-secret" not in str(info.value)
    assert load_config(conf(secret_key="é" * 16)).secret_key == "é" * 16  # 32 bytes in UTF-8


def test_repr_hides_secret_and_password() -> None:
    config = load_config(
        conf(database_url="postgresql+psycopg://alice:hunter2@db/x", secret_key="K" * 40)
    )
    shown = repr(config)
    assert "hunter2" not in shown and "K" * 40 not in shown
    assert "alice:***@db/x" in shown and "secret_key=<set>" in shown
    assert config.masked_url == "postgresql+psycopg://alice:***@db/x"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://app@db:5432/x?password=hunter2&sslmode=require",
            "postgresql+psycopg://app@db:5432/x?password=***&sslmode=require",
        ),
        (
            "postgresql://app@db/x?sslpassword=hunter2&sslkey=/k/hunter2.pem",
            "postgresql://app@db/x?sslkey=***&sslpassword=***",
        ),
        ("postgresql://app:hun@ter2@db/x", "postgresql://app:***@db/x"),  # unescaped @
        (
            "postgresql://app:hunter2@db/x?application_name=web",
            "postgresql://app:***@db/x?application_name=web",
        ),
    ],
)
def test_every_password_in_a_url_is_masked(url: str, shown: str) -> None:
    """A password in the query string (or after an unescaped @) used to be printed by
    repr(config), the CLI, the banner and error messages."""
    config = load_config(conf(database_url=url))
    assert config.masked_url == shown
    assert "hunter2" not in repr(config) and "ter2" not in repr(config)


@pytest.mark.parametrize(
    "url", ["mysql+pymysql://root@127.0.0.1/test", "mariadb://u:pw@h/db", "mysql://h/db"]
)
def test_mysql_refused_with_the_reason(url: str) -> None:
    with pytest.raises(ConfigurationError, match="MySQL/MariaDB cannot serve") as info:
        load_config(conf(database_url=url))
    assert ":pw@" not in str(info.value)


@pytest.mark.parametrize("url", ["oracle://u:pw@h/db", "not a url", "mssql+pyodbc://h/db"])
def test_unsupported_or_malformed_url_refused(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(conf(database_url=url))
    assert ":pw@" not in str(info.value)


def namespaced(**settings: Any) -> tuple[Any, str]:
    """Settings as Django gives them: uppercase, behind the CELERY_ namespace."""

    class Settings:
        pass

    obj = Settings()
    for key, value in settings.items():
        setattr(obj, key, value)
    app = Celery("cfgns", set_as_current=False)
    app.config_from_object(obj, namespace="CELERY")
    return app.conf, app.namespace


def test_celery_namespace_keys_are_read() -> None:
    conf, ns = namespaced(
        CELERY_SESSIONFLOW_DATABASE_URL="sqlite:////tmp/x.db", CELERY_SESSIONFLOW_RETENTION=0
    )
    config = load_config(conf, ns)
    assert config.database_url == "sqlite:////tmp/x.db" and config.retention == 0


def test_celery_namespace_typo_is_refused_as_written() -> None:
    conf, ns = namespaced(CELERY_SESSIONFLOW_DATABSE_URL="sqlite:////tmp/x.db")
    with pytest.raises(ConfigurationError, match="CELERY_SESSIONFLOW_DATABSE_URL"):
        load_config(conf, ns)


def test_errors_name_the_key_as_written() -> None:
    conf, ns = namespaced(CELERY_SESSIONFLOW_HEARTBEAT_INTERVAL=-1)
    with pytest.raises(ConfigurationError, match="CELERY_SESSIONFLOW_HEARTBEAT_INTERVAL"):
        load_config(conf, ns)


def test_sqlalchemy_url_objects_and_engine_options() -> None:
    from sqlalchemy.engine import URL

    url = URL.create("postgresql+psycopg", "alice", "hunter2", "db", 5432, "x")
    config = load_config(conf(database_url=url, engine_options={"pool_size": 3}))
    assert config.database_url == "postgresql+psycopg://alice:hunter2@db:5432/x"
    assert config.engine_options == {"pool_size": 3}
    assert "hunter2" not in repr(config) and "pool_size" not in repr(config)
    with pytest.raises(ConfigurationError, match="engine_options"):
        load_config(conf(engine_options={1: 2}))


@pytest.mark.parametrize("key", [*NUMERIC, "retention"])
@pytest.mark.parametrize("value", [10**400, 2**63, 1e300])
def test_huge_numbers_rejected_naming_the_key(key: str, value: Any) -> None:
    # 10**400 made math.isfinite raise OverflowError; 1e300 seconds or 2**63 sessions
    # were accepted and failed later (a timer, a timedelta, an SQL integer column).
    default = next(f.default for f in fields(Config) if f.name == key)
    if isinstance(default, int) and isinstance(value, float):
        value = int(value)
    with pytest.raises(ConfigurationError, match=f"sessionflow_{key}.*at most") as info:
        load_config(conf(**{key: value}))
    assert len(str(info.value)) < 300  # a 400-digit number is not printed whole


def test_largest_numbers_still_accepted() -> None:
    config = load_config(
        conf(max_concurrent_sessions=10**6, history_max_runs=2**31 - 1, retention=10**9)
    )
    assert config.max_concurrent_sessions == 10**6  # as `celery control sessions_cap` allows
    assert config.retention == 10**9


def test_config_is_never_pickled_with_its_secrets() -> None:
    # pickle.dumps(flow.config) carried the secret key and the unmasked password.
    key = "s3cret-key-for-the-pickle-test-0123456789"
    config = load_config(conf(secret_key=key, database_url="postgresql+psycopg://app:hunter2@db/x"))
    for dump in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match=r"app\.conf") as info:
            dump(config)
        assert key not in str(info.value) and "hunter2" not in str(info.value)
    assert "hunter2" not in repr(config) and key not in repr(config)

"""Settings of the example site.

Environment variables choose the services; without any, everything is local files:
SQLite, and Celery's settings for a Redis broker (the tests use sessionflow.testing's
embedded broker instead).

- ``DJSITE_DB``: ``sqlite`` (default) or ``postgres`` (127.0.0.1:5432, as the current user)
- ``DJSITE_PG_NAME``: the PostgreSQL database (default ``djsite``)
- ``DJSITE_DATA``: folder of the SQLite files (default ``./data``)
- ``DJSITE_BROKER_URL`` / ``DJSITE_RESULT_BACKEND``: Celery's broker and result backend
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DJSITE_DATA") or BASE_DIR / "data")
DATA.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("DJSITE_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJSITE_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "sessionflow.contrib.django",
    "reports",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "djsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "djsite.wsgi.application"

if os.environ.get("DJSITE_DB", "sqlite") == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("DJSITE_PG_NAME", "djsite"),
            "USER": getpass.getuser(),
            "HOST": "127.0.0.1",
            "PORT": "5432",
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA / "db.sqlite3",
            # A file, not memory: the workers are other processes and must see it.
            "TEST": {"NAME": DATA / "test-db.sqlite3"},
        }
    }

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Celery, through its namespace (Celery's Django guide).
CELERY_BROKER_URL = os.environ.get("DJSITE_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("DJSITE_RESULT_BACKEND", "redis://127.0.0.1:6379/1")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A sessionflow setting may come through the same namespace ...
CELERY_SESSIONFLOW_QUEUE_PREFIX = "djsite"
# ... or in one dict: the store lives in the default database, migrated by `migrate`.
SESSIONFLOW = {
    "DATABASE": "default",
    "MAX_CONCURRENT_SESSIONS": 4,
}

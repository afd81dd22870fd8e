"""Settings of the example project.

The database is a SQLite file next to ``manage.py`` unless ``DATABASE_URL`` names
another, e.g. ``postgresql://postgres@127.0.0.1:5432/test`` or
``mysql://root@127.0.0.1:3306/test``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
WORK_DIR = Path(
    os.environ.get("ANALYSIS_WORK_DIR", Path(tempfile.gettempdir()) / "dbcancel-example")
)


def database_from_url(url: str) -> dict[str, Any]:
    """A ``DATABASES`` entry from a URL (sqlite:///path, postgresql://..., mysql://...)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path[1:])}
    engines = {
        "postgres": "django.db.backends.postgresql",
        "postgresql": "django.db.backends.postgresql",
        "mysql": "django.db.backends.mysql",
        "mariadb": "django.db.backends.mysql",
    }
    if scheme not in engines:
        raise ValueError(f"DATABASE_URL: unsupported scheme {parts.scheme!r}")
    entry: dict[str, Any] = {
        "ENGINE": engines[scheme],
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }
    if engines[scheme].endswith("mysql"):
        entry["OPTIONS"] = {"charset": "utf8mb4"}
        try:
            import MySQLdb  # noqa: F401 - mysqlclient, Django's own MySQL driver
        except ImportError:
            # mysqlclient needs C headers to build; PyMySQL stands in for it.
            import pymysql

            pymysql.install_as_MySQLdb()
    return entry


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dbcancel-example-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "dbcancel.contrib.django",
    # Django Tasks, with its database backend: django.tasks is built into Django 6; on
    # Django 5.2 the django-tasks backport provides it.
    *([] if importlib.util.find_spec("django.tasks") else ["django_tasks"]),
    "django_tasks_db",
    "analyses",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "config.urls"
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
WSGI_APPLICATION = "config.wsgi.application"

# ATOMIC_REQUESTS stays off: dbcancel commits each cancel at once, so that the worker
# sees it while the delete view waits for the worker to stop.
DATABASES = {
    "default": database_from_url(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'analyses.db'}")
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The worker threads and the request threads write to the same file.
    DATABASES["default"]["OPTIONS"] = {"timeout": 30}

# Analyses are Django Tasks, rows of the same database, run by `manage.py db_worker`.
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
LOGIN_URL = "admin:login"

# The app's own settings.
ANALYSIS_RUNNER = os.environ.get("ANALYSIS_RUNNER", "tasks")
"""How the start view runs an analysis: "tasks" enqueues the Django Task
``analyses.tasks.analyse`` for `manage.py db_worker`; "thread" runs it in a thread of the
web process, with no worker to start."""
ANALYSIS_INPUTS = WORK_DIR / "inputs"
"""Folders that analyses may walk; the start view takes a folder name inside it."""
ANALYSIS_ROOT = WORK_DIR / "outputs"
"""Where each analysis writes its results, one folder per analysis."""
ANALYSIS_INTERVAL = 0.5
"""Seconds between two polls of a running analysis' row (a cancel issued in this process
reaches it at once)."""
ANALYSIS_STOP_TIMEOUT = 10.0
"""How long the delete view waits for a cancelled analysis to stop before giving up."""
ANALYSIS_FILE_DELAY = float(os.environ.get("ANALYSIS_FILE_DELAY", "0.005"))
"""Extra seconds per file, standing in for heavier work: slow enough to watch (and for
the demo to catch the analysis midway), fast enough not to bore."""

# The analyses' start, cancel and end, in the server's and the worker's output (stderr):
# the app's own lines ("analyses") and dbcancel's warnings. db_worker adds its own line
# per task, a cancel's included.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "analyses": {"handlers": ["console"], "level": "INFO"},
        "dbcancel": {"handlers": ["console"], "level": "WARNING"},
    },
}

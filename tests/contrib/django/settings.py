"""Django settings for the test suite: one database alias per server.

* ``default``: SQLite, in a file (threads and child processes must reach it);
* ``postgresql`` and ``mariadb``: the servers of ``DBCANCEL_TEST_POSTGRESQL`` and
  ``DBCANCEL_TEST_MARIADB`` (SQLAlchemy URLs, the variables ``tests/conftest.py`` reads);
* ``postgresql_tenant``: the test database of ``postgresql`` (a test mirror), with the
  ``search_path`` of its connections set to a schema of its own, :data:`TENANT_SCHEMA`
  (``test_tenants.py`` creates it and its tables): the same table names as
  ``postgresql``'s, other tables.

pytest-django creates a test database per alias. Their names carry the process id and a
random suffix, so that runs of the suite started at the same time on one machine do not
drop each other's databases. Django is configured by :func:`configure`, which the
conftests of the Django test directories call when pytest imports them: a run of the
other tests alone never imports Django.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "django_app"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"

SERVERS = {
    "postgresql": os.environ.get(
        "DBCANCEL_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get("DBCANCEL_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
ALIASES = {"sqlite": "default", "postgresql": "postgresql", "mariadb": "mariadb"}
"""Database name (as the rest of the suite calls them) → Django alias."""
TENANT_ALIAS = "postgresql_tenant"
TENANT_SCHEMA = f"t{RUN}"
"""The schema every connection of :data:`TENANT_ALIAS` has as its ``search_path``."""

_unreachable: dict[str, str | None] = {}


def _tasks_module() -> str:
    """Where Django Tasks is: built into Django 6, the backport before."""
    import importlib.util

    return "django.tasks" if importlib.util.find_spec("django.tasks") else "django_tasks"


TASKS_MODULE = _tasks_module()
TASKS_APPS = (
    ["django_tasks_db"] if TASKS_MODULE == "django.tasks" else ["django_tasks", "django_tasks_db"]
)


def _server(name: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    url = make_url(SERVERS[name])
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql"
        if name == "postgresql"
        else "django.db.backends.mysql",
        "NAME": url.database or "test",
        "USER": url.username or "",
        "PASSWORD": url.password or "",
        "HOST": url.host or "127.0.0.1",
        "PORT": str(url.port or ""),
        # Created on their own: none of their tables refer to another database.
        "TEST": {"NAME": f"test_dbcancel_{RUN}", "DEPENDENCIES": []},
    }
    if name == "mariadb":
        entry["OPTIONS"] = {"charset": "utf8mb4"}
        entry["TEST"]["CHARSET"] = "utf8mb4"
    return entry


def databases() -> dict[str, dict[str, Any]]:
    """``DATABASES`` for this run (the test database names included)."""
    folder = Path(tempfile.gettempdir())
    return {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(folder / f"dbcancel_django_{RUN}.sqlite3"),
            # A generous busy timeout: threads of one test write to the same file.
            "OPTIONS": {"timeout": 30},
            "TEST": {"NAME": str(folder / f"test_dbcancel_django_{RUN}.sqlite3")},
        },
        "postgresql": _server("postgresql"),
        "mariadb": _server("mariadb"),
        TENANT_ALIAS: {
            **_server("postgresql"),
            "OPTIONS": {"options": f"-c search_path={TENANT_SCHEMA}"},
            # Not created, nor flushed: it is postgresql's test database.
            "TEST": {"MIRROR": "postgresql"},
        },
    }


def unreachable(name: str) -> str | None:
    """Why the server behind ``name`` ("postgresql", "mariadb") cannot be used, or None."""
    if name == "sqlite":
        return None
    if name not in _unreachable:
        entry = _server(name)
        try:
            if name == "postgresql":
                import psycopg

                psycopg.connect(
                    host=entry["HOST"],
                    port=entry["PORT"] or None,
                    user=entry["USER"],
                    password=entry["PASSWORD"] or None,
                    dbname=entry["NAME"],
                    connect_timeout=3,
                ).close()
            else:
                import pymysql

                pymysql.connect(
                    host=entry["HOST"],
                    port=int(entry["PORT"] or 3306),
                    user=entry["USER"],
                    password=entry["PASSWORD"],
                    database=entry["NAME"],
                    connect_timeout=3,
                ).close()
        except Exception as err:  # any driver error means unreachable
            _unreachable[name] = f"{name} is not reachable: {err}"
        else:
            _unreachable[name] = None
    return _unreachable[name]


def settings_dict() -> dict[str, Any]:
    """Everything but ``DATABASES``, as keyword arguments of ``settings.configure()``."""
    return {
        "DEBUG": False,
        "SECRET_KEY": "dbcancel-tests-only",
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        "ALLOWED_HOSTS": ["testserver", "localhost"],
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "INSTALLED_APPS": [
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "dbcancel.contrib.django",
            *TASKS_APPS,
            "tests.contrib.django.testapp",
            "analyses",  # the example project's app, examples/django_app/analyses
        ],
        "MIDDLEWARE": [
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        "TEMPLATES": [
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
        ],
        "ROOT_URLCONF": "tests.contrib.django.urls",
        # Django Tasks on the database backend: tasks are rows of the alias the router
        # picks, run by ``manage.py db_worker`` (tests/contrib/django/test_tasks.py).
        "TASKS": {
            "default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]},
            # Runs a task inside enqueue(), in the caller's thread.
            "immediate": {"BACKEND": f"{TASKS_MODULE}.backends.immediate.ImmediateBackend"},
        },
        "DATABASE_ROUTERS": ["tests.contrib.django.routers.OneDatabase"],
        "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],
        # The example app's settings, as its project sets them.
        "ANALYSIS_ROOT": str(Path(tempfile.gettempdir()) / f"dbcancel_analyses_{RUN}"),
        "ANALYSIS_INTERVAL": 0.05,
        "ANALYSIS_STOP_TIMEOUT": 10.0,
        "ANALYSIS_FILE_DELAY": 0.0,
        # In a thread of the test process, which the tests hold and join; the tests of
        # the Django Task set "tasks" and start a db_worker.
        "ANALYSIS_RUNNER": "thread",
    }


def _drivers() -> None:
    # Django's MySQL backend imports MySQLdb (mysqlclient, which needs C headers to
    # build); PyMySQL stands in for it, as it does for the SQLAlchemy tests.
    import pymysql

    pymysql.install_as_MySQLdb()
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))


def configure() -> None:
    """Configure Django for this test run (once; later calls do nothing)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    _drivers()
    settings.configure(DATABASES=databases(), **settings_dict())
    django.setup()


CHILD_ENV = "DBCANCEL_DJANGO_CHILD_DB"


CHILD_SETTINGS_ENV = "DBCANCEL_DJANGO_CHILD_SETTINGS"


def child_env(alias: str, **overrides: Any) -> dict[str, str]:
    """Environment for a child process that must reach the test database of ``alias``.

    pytest-django has renamed the alias' database to ``test_...`` by now; the child gets
    that real name, not the one in ``databases()``. ``overrides`` are settings the child
    takes instead of those of :func:`settings_dict` (JSON values: paths as strings).
    """
    from django.db import connections

    entry = dict(connections[alias].settings_dict)
    keep = {k: entry[k] for k in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS")}
    env = dict(os.environ)
    env[CHILD_ENV] = json.dumps(keep)
    env[CHILD_SETTINGS_ENV] = json.dumps(overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


WORKER_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        name: {"handlers": ["console"], "level": "INFO", "propagate": False}
        for name in ("django.tasks", "django_tasks")
    },
}
"""Task lines of a child's db_worker on its stderr, with Django 6 and with the backport."""


def configure_child() -> None:
    """In a child process: configure Django with the one database passed by :func:`child_env`."""
    import django
    from django.conf import settings

    _drivers()
    entry = json.loads(os.environ[CHILD_ENV])
    options = settings_dict()
    options.update(json.loads(os.environ.get(CHILD_SETTINGS_ENV, "{}")))
    # Django 6's task logger, "django.tasks", sits under "django", whose default console
    # handler prints only with DEBUG=True: db_worker then adds no handler of its own and
    # its task lines go nowhere. The tests read a worker's log, so it gets a console
    # handler, as a deployed worker's LOGGING would give it.
    options.setdefault("LOGGING", WORKER_LOGGING)
    settings.configure(DATABASES={"default": entry}, **options)
    django.setup()


@contextmanager
def suite_order_kept() -> Iterator[None]:
    """Keep pytest-django from reordering the whole suite while collection ends.

    Once Django is configured, pytest-django sorts every collected test as Django's runner
    would: those using a fixture named ``db`` first (tests/conftest.py's SQLAlchemy
    fixture has that name), then transactional ones, then the rest. That would reshuffle
    the non-Django suite and split the runs of its session databases. Every Django test
    here is transactional, so the sort buys them nothing: for the duration of the hook it
    is told that Django is not configured.
    """
    from pytest_django import plugin

    configured = plugin.django_settings_is_configured
    plugin.django_settings_is_configured = lambda: False
    try:
        yield
    finally:
        plugin.django_settings_is_configured = configured

"""Django for the tests in this folder, and one database fixture over the three aliases.

Django is configured when pytest imports this file, so a run that does not collect these
tests never imports Django. ``alias`` is parametrized over SQLite / PostgreSQL / MariaDB
with the suite's markers; each of its params carries
``django_db(transaction=True, databases=[alias])``: workers run in other threads and
processes, which only see committed rows. An unreachable server skips its tests locally
and fails them under ``CI=true``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from . import settings as test_settings

test_settings.configure()

from django.db import connections  # noqa: E402 - Django is configured just above

from dbcancel.contrib.django import DjangoJobs  # noqa: E402

from .testapp.models import Analysis  # noqa: E402

INTERVAL = 0.05
JOIN_TIMEOUT = 60


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems() -> Iterator[None]:
    """See :func:`tests.contrib.django.settings.suite_order_kept`."""
    with test_settings.suite_order_kept():
        return (yield)


def database_param(name: str, *marks: Any) -> Any:
    """``pytest.param(alias)`` for the database ``name``, with its marker and django_db."""
    alias = test_settings.ALIASES[name]
    every = [getattr(pytest.mark, name), *marks]
    if test_settings.unreachable(name) is None:
        every.append(pytest.mark.django_db(transaction=True, databases=[alias]))
    return pytest.param(alias, marks=every, id=name)


def check_reachable(alias: str) -> None:
    """Skip (locally) or fail (under CI) a test whose database server is down."""
    name = next(n for n, a in test_settings.ALIASES.items() if a == alias)
    reason = test_settings.unreachable(name)
    if reason is None:
        return
    if test_settings.IN_CI:
        pytest.fail(f"{reason} (under CI=true every database must be up)")
    pytest.skip(reason)


@pytest.fixture(params=[database_param(name) for name in test_settings.ALIASES])
def alias(request: pytest.FixtureRequest) -> str:
    """The Django database alias of this test: default (SQLite), postgresql or mariadb."""
    check_reachable(request.param)
    return str(request.param)


@pytest.fixture
def jobs(alias: str) -> DjangoJobs:
    """``DjangoJobs`` of the test app's Analysis on this test's alias."""
    return DjangoJobs(Analysis, interval=INTERVAL, using=alias)


@pytest.fixture
def add(alias: str) -> Callable[..., int]:
    """Insert one Analysis (pending unless ``status`` is given); return its id."""

    def add(**values: Any) -> int:
        return int(Analysis.objects.using(alias).create(**values).pk)

    return add


@pytest.fixture
def row(alias: str) -> Callable[[int], Analysis | None]:
    """The Analysis with this id as the database has it now, or None."""

    def row(job_id: int) -> Analysis | None:
        return Analysis.objects.using(alias).filter(pk=job_id).first()

    return row


class Threads:
    """Daemon threads that record what escaped them and close their Django connections."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[tuple[str, BaseException]] = []

    def start(self, target: Callable[[], object], name: str = "test-thread") -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.errors.append((name, exc))
            finally:
                # The thread's own queries (cancel, wait, reads) are the test's to close;
                # DjangoJobs closes only the connection a run() used.
                connections.close_all()

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join(self) -> None:
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert alive == [], f"threads still running: {alive}"
        assert self.errors == [], self.errors


@pytest.fixture
def threads() -> Iterator[Threads]:
    """Start test threads with ``threads.start(fn)``; joined and checked at teardown."""
    t = Threads()
    yield t
    t.join()


@pytest.fixture(scope="session", autouse=True)
def _watchers_closed(django_db_setup: Any) -> Iterator[None]:
    """Watcher threads keep their connections open for a while after their last job;
    pytest-django drops the test databases right after the last test, which PostgreSQL
    refuses while a connection is open. Torn down before ``django_db_setup``."""
    yield
    import dbcancel.testing

    dbcancel.testing.close_watchers()

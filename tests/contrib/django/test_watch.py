"""``DjangoJobs`` in the watched mode (its default): one watcher thread per process and
table, batched polls, ``stats()``, ``max_staleness`` and, on PostgreSQL, NOTIFY — shared
with the SQLAlchemy side's watchers. The SQLAlchemy equivalents are in
tests/integration/test_watcher.py.

Some tests wait for a state that nothing signals (failing polls counted) with
:func:`wait_until`, which re-checks every 20 ms up to a generous bound.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connections

from dbcancel import Cancelled, Jobs, Status
from dbcancel.contrib.django import DjangoJobs

from . import settings as test_settings
from .conftest import JOIN_TIMEOUT, Threads
from .testapp.models import Analysis

ROOT = test_settings.ROOT
INTERVAL = 0.2


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def cancel_in_a_child(alias: str, job: int, reason: str) -> float:
    """Cancel ``job`` from another process; return when (time.monotonic()) it returned."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.contrib.django.child", "cancel", str(job), reason],
        cwd=ROOT,
        env=test_settings.child_env(alias),
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
    )
    assert done.stdout == "cancel returned True\n", done.stderr
    return time.monotonic()


class Worker:
    """A worker thread looping on ``cp()`` inside ``jobs.run(job)``; records how it ended."""

    def __init__(self, threads: Threads, jobs: Any, job: int) -> None:
        self.entered = threading.Event()
        self.left = threading.Event()
        self.cp: Any = None
        self.reason: str | None = None
        self.left_at: float | None = None
        self.callback_thread: threading.Thread | None = None

        def main() -> None:
            try:
                with jobs.run(job) as cp:
                    self.cp = cp
                    cp.on_cancel(self._called)
                    self.entered.set()
                    try:
                        while True:
                            cp()
                            time.sleep(0.001)  # one item of work
                    except Cancelled as exc:
                        self.reason = exc.reason
                        raise
            finally:
                self.left_at = time.monotonic()
                self.left.set()

        self.thread = threads.start(main, name="worker")
        assert self.entered.wait(JOIN_TIMEOUT), "the worker did not enter run()"

    def _called(self) -> None:
        self.callback_thread = threading.current_thread()


def test_watched_by_default_and_threadless_on_request_or_with_a_clock():
    assert DjangoJobs(Analysis).watch is True
    assert DjangoJobs(Analysis, watch=False).watch is False
    assert DjangoJobs(Analysis, clock=time.monotonic).watch is False
    assert "watch=False" in repr(DjangoJobs(Analysis, watch=False))
    with pytest.raises(ValueError, match="real time"):
        DjangoJobs(Analysis, watch=True, clock=time.monotonic)
    with pytest.raises(TypeError, match="watch must be None, True or False"):
        DjangoJobs(Analysis, watch="yes")


def test_a_watched_job_is_cancelled_from_another_thread(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=3600, using=alias)
    job = add()
    w = Worker(threads, jobs, job)
    assert w.cp.watched
    assert jobs.cancel(job, reason="from a thread") is True
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert w.reason == "from a thread"
    assert jobs.status(job) is Status.CANCELLED


def test_a_watched_job_is_cancelled_from_another_process(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=INTERVAL, using=alias)
    job = add()
    w = Worker(threads, jobs, job)
    committed_at = cancel_in_a_child(alias, job, "elsewhere")
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert w.reason == "elsewhere"
    assert w.left_at is not None
    assert w.left_at - committed_at < INTERVAL + 5
    # Seen by the watcher (its poll, or the notification), not by the worker's cp().
    assert w.callback_thread is not None
    assert w.callback_thread.name.startswith("dbcancel-runtime")
    assert jobs.wait(job, timeout=JOIN_TIMEOUT) is Status.CANCELLED


def test_the_watcher_polls_every_job_in_one_query(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=INTERVAL, using=alias)
    ids = [add() for _ in range(20)]
    workers = [Worker(threads, jobs, job) for job in ids]
    before = jobs.stats().polls
    time.sleep(INTERVAL * 5)  # the length of the measurement, not a synchronisation
    polls = jobs.stats().polls - before
    # About five polls of the 20 jobs, each one query; the jobs' own cp() never polls.
    assert 1 <= polls <= 12, polls
    for job in ids:
        assert jobs.cancel(job)
    for w in workers:
        assert w.left.wait(JOIN_TIMEOUT)
    threads.join()


def test_stats_show_the_watcher(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=INTERVAL, using=alias)
    job = add()
    w = Worker(threads, jobs, job)
    before = jobs.stats().polls
    wait_until(lambda: jobs.stats().polls >= before + 2, 30, "two polls by the watcher")
    stats = jobs.stats()
    assert stats.active_jobs == 1
    assert stats.watching is True
    postgresql = connections[alias].vendor == "postgresql"
    if postgresql:
        wait_until(lambda: jobs.stats().listening, 30, "the listener")
    else:
        assert stats.listening is False
    assert jobs.cancel(job)
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert jobs.stats().active_jobs == 0


@contextlib.contextmanager
def table_gone(alias: str) -> Iterator[None]:
    """A real database error for every poll: the table is renamed away for a while."""
    table = Analysis._meta.db_table
    other = f"{table}_gone_{uuid.uuid4().hex[:6]}"
    mariadb = connections[alias].vendor == "mysql"
    rename = "RENAME TABLE {} TO {}" if mariadb else "ALTER TABLE {} RENAME TO {}"
    with connections[alias].cursor() as cursor:
        cursor.execute(rename.format(table, other))
    try:
        yield
    finally:
        with connections[alias].cursor() as cursor:
            cursor.execute(rename.format(other, table))


def test_max_staleness_cancels_a_watched_job_locally(alias, add, threads, caplog):
    jobs = DjangoJobs(Analysis, interval=INTERVAL, using=alias, max_staleness=1.0)
    job = add()
    caplog.set_level(logging.WARNING, logger="dbcancel")
    w = Worker(threads, jobs, job)
    errors = jobs.stats().poll_errors
    with table_gone(alias):
        broken = time.monotonic()
        assert w.left.wait(JOIN_TIMEOUT), "the job was not cancelled locally"
        assert time.monotonic() - broken >= 1.0 - 2 * INTERVAL
        assert jobs.stats().poll_errors > errors
    threads.join()
    assert "max_staleness=1.0s" in (w.reason or "")
    # The worker left while the table was away: the row could not be told; it stays in
    # progress for reap().
    assert any("could not be updated" in r.getMessage() for r in caplog.records)


def test_an_outage_does_not_stop_a_watched_job_by_default(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=INTERVAL, using=alias)
    job = add()
    w = Worker(threads, jobs, job)
    errors = jobs.stats().poll_errors
    with table_gone(alias):
        wait_until(lambda: jobs.stats().poll_errors >= errors + 2, 30, "failing polls")
        assert not w.cp.cancelled
    # The watcher's connection survived the errors; the next polls work again.
    wait_until(lambda: jobs.stats().outage is None, 30, "the end of the outage")
    assert jobs.cancel(job)
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()


# -- PostgreSQL: NOTIFY --------------------------------------------------------------------


def postgresql_alias() -> Any:
    from .conftest import database_param

    return pytest.mark.parametrize("alias", [database_param("postgresql")], indirect=True)


@postgresql_alias()
def test_a_cancel_notifies_on_the_tables_channel_only_when_it_changed_a_row(alias, add):
    import psycopg
    from psycopg import sql

    jobs = DjangoJobs(Analysis, interval=INTERVAL, using=alias)
    first, second = add(session_id="x"), add(session_id="x")
    channel = jobs._backend.channel
    assert channel.startswith("dbcancel:")
    assert channel.endswith(f".{Analysis._meta.db_table}")
    params = connections[alias].get_connection_params()
    with psycopg.connect(**params, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        assert jobs.cancel(first, reason="r") is True
        got = [n.payload for n in conn.notifies(timeout=1.0)]
        assert got == [f'["{first}", "r"]']
        assert jobs.cancel(first) is True  # already cancelled: nothing changed
        assert jobs.cancel_where(session_id="x") == 1
        assert [n.payload for n in conn.notifies(timeout=1.0)] == ["*"]
    assert jobs.status(second) is Status.CANCELLED


@postgresql_alias()
def test_notify_stops_a_watched_job_long_before_its_interval(alias, add, threads):
    """Interval 10 s: only the notification can stop the worker within a few seconds."""
    jobs = DjangoJobs(Analysis, interval=10.0, using=alias)
    job = add()
    w = Worker(threads, jobs, job)
    wait_until(lambda: jobs.stats().listening, 30, "the listener")
    notified = jobs.stats().notifications
    committed_at = cancel_in_a_child(alias, job, "pushed")
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert w.left_at is not None
    assert w.left_at - committed_at < 3.0
    assert w.reason == "pushed"
    assert jobs.stats().notifications > notified


def sqlalchemy_jobs(alias: str, interval: float) -> Jobs:
    """A SQLAlchemy ``Jobs`` of the same table, in the same test database."""
    from sqlalchemy import MetaData, Table, create_engine
    from sqlalchemy.engine import URL

    entry = connections[alias].settings_dict
    url = URL.create(
        "postgresql+psycopg",
        username=entry["USER"] or None,
        password=entry["PASSWORD"] or None,
        host=entry["HOST"] or None,
        port=int(entry["PORT"]) if entry["PORT"] else None,
        database=entry["NAME"],
    )
    engine = create_engine(url)
    table = Table(Analysis._meta.db_table, MetaData(), autoload_with=engine)
    return Jobs(engine, table, interval=interval, watch=True)


@postgresql_alias()
def test_a_sqlalchemy_cancel_wakes_a_django_watcher(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=10.0, using=alias)
    other = sqlalchemy_jobs(alias, 10.0)
    job = add()
    w = Worker(threads, jobs, job)
    wait_until(lambda: jobs.stats().listening, 30, "the listener")
    assert other.cancel(job, reason="from SQLAlchemy") is True
    # The SQLAlchemy side is in this process too but knows nothing of this worker: its
    # registry is per backend. Only the notification can stop it this soon.
    cancelled = time.monotonic()
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert w.left_at is not None
    assert w.left_at - cancelled < 3.0
    assert w.reason == "from SQLAlchemy"
    other._backend.engine.dispose()


@postgresql_alias()
def test_a_django_cancel_wakes_a_sqlalchemy_watcher(alias, add, threads):
    jobs = DjangoJobs(Analysis, interval=10.0, using=alias)
    other = sqlalchemy_jobs(alias, 10.0)
    job = add()
    w = Worker(threads, other, job)
    wait_until(lambda: other.stats().listening, 30, "the SQLAlchemy listener")
    assert jobs.cancel(job, reason="from Django") is True
    cancelled = time.monotonic()
    assert w.left.wait(JOIN_TIMEOUT)
    threads.join()
    assert w.left_at is not None
    assert w.left_at - cancelled < 3.0
    assert w.reason == "from Django"
    other._backend.engine.dispose()

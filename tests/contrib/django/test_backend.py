"""``DjangoBackend``'s worker heartbeat, reap and stop stamps, called directly, on every
database.

``Jobs`` builds on these (the heartbeat thread, ``jobs.reap()``); the tests here pin the
SQL each sends and what it does to rows in every status.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from dbcancel import Status
from dbcancel.contrib.django.backend import DjangoBackend
from dbcancel.contrib.django.models import Worker

from .testapp.models import Analysis

LONG_AGO = dt.datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=dt.UTC)
EARLIER = dt.datetime(2030, 1, 2, 3, 4, 5, 111111, tzinfo=dt.UTC)
LATER = dt.datetime(2030, 1, 2, 3, 4, 9, 999999, tzinfo=dt.UTC)


@pytest.fixture
def backend(alias: str) -> DjangoBackend:
    return DjangoBackend(Analysis, alias)


def statements(ctx: CaptureQueriesContext) -> list[str]:
    """The first word of every statement sent: UPDATE, SELECT, ..."""
    return [q["sql"].split(None, 1)[0].upper() for q in ctx.captured_queries]


def now_between(value: dt.datetime | None, t0: dt.datetime, t1: dt.datetime) -> bool:
    slack = dt.timedelta(seconds=2)  # the server's clock and ours
    return value is not None and t0 - slack <= value <= t1 + slack


# -- mark_stopped -------------------------------------------------------------------------


def test_mark_stopped_stamps_the_first_observation(alias, backend, add, row):
    observed = add(status=Status.CANCELLED, started_at=LONG_AGO)
    seen_before = add(status=Status.CANCELLED, started_at=LONG_AGO, cancel_observed_at=EARLIER)
    t0 = dt.datetime.now(dt.UTC)

    with CaptureQueriesContext(connections[alias]) as ctx:
        backend.mark_stopped(observed, observed_at=LATER)
    backend.mark_stopped(seen_before, observed_at=LATER)

    t1 = dt.datetime.now(dt.UTC)
    # One UPDATE; on PostgreSQL the end is announced (pg_notify) in its transaction.
    sent = [q["sql"] for q in ctx.captured_queries]
    assert [s for s in statements(ctx) if s == "UPDATE"] == ["UPDATE"]
    assert not [
        q for q in sent if q.startswith("SELECT") and "pg_notify" not in q and "regclass" not in q
    ]
    stopped = row(observed)
    assert stopped.cancel_observed_at == LATER
    assert now_between(stopped.finished_at, t0, t1)
    # An earlier observation is kept: the first worker to see the cancel counts.
    kept = row(seen_before)
    assert kept.cancel_observed_at == EARLIER
    assert now_between(kept.finished_at, t0, t1)


def test_mark_stopped_without_an_observation_leaves_it_null(backend, add, row):
    job = add(status=Status.COMPLETED, started_at=LONG_AGO)
    backend.mark_stopped(job)
    assert row(job).finished_at is not None
    assert row(job).cancel_observed_at is None


def test_mark_stopped_leaves_a_stopped_job_alone(backend, add, row):
    job = add(status=Status.CANCELLED, finished_at=EARLIER)
    backend.mark_stopped(job, observed_at=LATER)
    assert (row(job).finished_at, row(job).cancel_observed_at) == (EARLIER, None)


# -- beat_worker --------------------------------------------------------------------------


def test_beat_worker_inserts_then_updates_on_the_servers_clock(alias, backend):
    workers = Worker.objects.using(alias)
    t0 = dt.datetime.now(dt.UTC)
    with CaptureQueriesContext(connections[alias]) as first:
        backend.beat_worker("host:1:aa", 10)
    inserted = workers.get(pk="host:1:aa")
    assert inserted.expires_at == inserted.heartbeat_at + dt.timedelta(seconds=30)
    with CaptureQueriesContext(connections[alias]) as second:
        backend.beat_worker("host:1:aa", 0.5)
    t1 = dt.datetime.now(dt.UTC)
    worker = workers.get(pk="host:1:aa")
    assert now_between(worker.started_at, t0, t1)
    assert now_between(worker.heartbeat_at, t0, t1)
    assert worker.heartbeat_at >= worker.started_at
    # Three periods after the beat, on the same clock (SQLite's keeps milliseconds).
    lifetime = worker.expires_at - worker.heartbeat_at
    assert dt.timedelta(seconds=1.499) <= lifetime <= dt.timedelta(seconds=1.5)
    assert "INSERT" in statements(first)
    # Once the row is there: one UPDATE per beat, whatever the number of jobs.
    assert [s for s in statements(second) if s in ("UPDATE", "INSERT", "SELECT")] == ["UPDATE"]
    workers.filter(pk="host:1:aa").delete()


# -- reap ---------------------------------------------------------------------------------


def test_reap_stops_jobs_whose_worker_is_gone(alias, backend, add, row):
    fresh = dt.datetime.now(dt.UTC)
    old = fresh - dt.timedelta(seconds=31)
    workers = Worker.objects.using(alias)
    workers.create(id="dead:1:aa", started_at=LONG_AGO, heartbeat_at=old)
    workers.create(id="live:2:bb", started_at=LONG_AGO, heartbeat_at=fresh)
    lost = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, heartbeat_at=old)
    never_beat = add(status=Status.IN_PROGRESS, started_at=old)
    unstopped = add(
        status=Status.CANCELLED, started_at=LONG_AGO, heartbeat_at=old, cancel_reason="r"
    )
    dead_worker = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, worker_id="dead:1:aa")
    gone_worker = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, worker_id="gone:3:cc")
    alive = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, heartbeat_at=fresh)
    alive_cancelled = add(status=Status.CANCELLED, started_at=LONG_AGO, heartbeat_at=fresh)
    untouched = {
        "alive": alive,
        "alive cancelled": alive_cancelled,
        "live worker": add(status=Status.IN_PROGRESS, started_at=LONG_AGO, worker_id="live:2:bb"),
        "pending": add(),
        "stopped": add(
            status=Status.CANCELLED, started_at=LONG_AGO, heartbeat_at=old, finished_at=old
        ),
        "failed": add(status=Status.FAILED, heartbeat_at=old, finished_at=old, error="boom"),
        "completed, never stopped": add(status=Status.COMPLETED, heartbeat_at=old),
    }
    before = {name: row(job) for name, job in untouched.items()}
    t0 = dt.datetime.now(dt.UTC)

    with CaptureQueriesContext(connections[alias]) as ctx:
        count = backend.reap(30, "worker lost")

    t1 = dt.datetime.now(dt.UTC)
    assert count == 5
    updates = [q["sql"] for q in ctx.captured_queries if q["sql"].upper().startswith("UPDATE")]
    (sql,) = updates
    q = connections[alias].ops.quote_name
    # MariaDB evaluates SET left to right: error must read the old status.
    assert sql.index(f"{q('error')} = ") < sql.index(f"{q('status')} = ")
    for job in (lost, never_beat, dead_worker, gone_worker):
        failed = row(job)
        assert (failed.status, failed.error) == (Status.FAILED, "worker lost")
        assert now_between(failed.finished_at, t0, t1)
    cancelled = row(unstopped)
    assert (cancelled.status, cancelled.error, cancelled.cancel_reason) == (
        Status.CANCELLED,
        None,
        "r",
    )
    assert now_between(cancelled.finished_at, t0, t1)
    for name, job in untouched.items():
        after = row(job)
        assert (after.status, after.error, after.finished_at) == (
            before[name].status,
            before[name].error,
            before[name].finished_at,
        ), name
    # The dead worker's row went with its last job; the live one stays.
    assert sorted(workers.values_list("pk", flat=True)) == ["live:2:bb"]

    assert backend.reap(30, "worker lost") == 0
    workers.all().delete()


def test_reap_keeps_the_error_within_bounds(backend, add, row):
    job = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, heartbeat_at=LONG_AGO)
    assert backend.reap(30, "x" * 5000) == 1
    assert row(job).error == "x" * 2000

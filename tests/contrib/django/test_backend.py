"""``DjangoBackend``'s heartbeat, reap and stop stamps, called directly, on every database.

``Jobs`` builds on these (``watch=True`` beats, ``jobs.reap()``); the tests here pin the
SQL each sends and what it does to rows in every status.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from dbcancel import Status
from dbcancel._backend import JobRow
from dbcancel.contrib.django.backend import DjangoBackend

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
    assert [s for s in statements(ctx) if s in ("UPDATE", "SELECT")] == ["UPDATE"]
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


# -- beat ---------------------------------------------------------------------------------


def test_beat_stamps_every_status_and_returns_the_rows(alias, backend, add, row):
    ids = {
        status: add(status=status, heartbeat_at=LONG_AGO, started_at=LONG_AGO) for status in Status
    }
    cancelled = ids[Status.CANCELLED]
    Analysis.objects.using(alias).filter(pk=cancelled).update(
        cancel_reason="user left", finished_at=EARLIER
    )
    missing = max(ids.values()) + 1000
    t0 = dt.datetime.now(dt.UTC)

    with CaptureQueriesContext(connections[alias]) as ctx:
        rows = backend.beat([*ids.values(), missing])

    t1 = dt.datetime.now(dt.UTC)
    sent = [s for s in statements(ctx) if s in ("UPDATE", "SELECT")]
    assert sent == ["UPDATE", "SELECT"]
    assert rows == {
        **{job: JobRow(status, None, None) for status, job in ids.items()},
        cancelled: JobRow(Status.CANCELLED, "user left", EARLIER),
    }
    for job in ids.values():
        assert now_between(row(job).heartbeat_at, t0, t1)


def test_beat_of_no_jobs_sends_nothing(alias, backend):
    with CaptureQueriesContext(connections[alias]) as ctx:
        assert backend.beat([]) == {}
        assert backend.beat(set()) == {}
    assert ctx.captured_queries == []


# -- reap ---------------------------------------------------------------------------------


def test_reap_stops_jobs_whose_worker_is_gone(alias, backend, add, row):
    fresh = dt.datetime.now(dt.UTC)
    cutoff = fresh - dt.timedelta(seconds=30)
    old = cutoff - dt.timedelta(seconds=1)
    lost = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, heartbeat_at=old)
    never_beat = add(status=Status.IN_PROGRESS, started_at=old)
    unstopped = add(
        status=Status.CANCELLED, started_at=LONG_AGO, heartbeat_at=old, cancel_reason="r"
    )
    alive = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, heartbeat_at=fresh)
    alive_cancelled = add(status=Status.CANCELLED, started_at=LONG_AGO, heartbeat_at=fresh)
    untouched = {
        "alive": alive,
        "alive cancelled": alive_cancelled,
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
        count = backend.reap(cutoff, "worker lost")

    t1 = dt.datetime.now(dt.UTC)
    assert count == 3
    updates = [q["sql"] for q in ctx.captured_queries if q["sql"].upper().startswith("UPDATE")]
    (sql,) = updates
    q = connections[alias].ops.quote_name
    # MariaDB evaluates SET left to right: error must read the old status.
    assert sql.index(f"{q('error')} = ") < sql.index(f"{q('status')} = ")
    for job in (lost, never_beat):
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

    assert backend.reap(cutoff, "worker lost") == 0


def test_reap_keeps_the_error_within_bounds(backend, add, row):
    job = add(status=Status.IN_PROGRESS, started_at=LONG_AGO, heartbeat_at=LONG_AGO)
    assert backend.reap(EARLIER, "x" * 5000) == 1
    assert row(job).error == "x" * 2000

"""The poll rate bound, measured in SQL statements on every database.

A fake clock decides when a poll is due; SQLAlchemy's ``before_cursor_execute`` event
counts what really reaches the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import event, update

from dbcancel import Cancelled, Status
from dbcancel.testing import FakeClock
from tests.models import Analysis

INTERVAL = 1.0
# A SELECT reading the job table (not analysis_result), however the dialect quotes it.
SELECT_ANALYSIS = re.compile(r"^\s*SELECT\b.*\bFROM\s+[`\"]?analysis[`\"]?(\s|$)", re.I | re.S)


@dataclass
class Statements:
    """Every statement the engine sent since the last ``reset()``."""

    seen: list[str] = field(default_factory=list)

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.seen.append(statement)

    def reset(self) -> None:
        self.seen.clear()

    @property
    def total(self) -> int:
        return len(self.seen)

    @property
    def selects(self) -> int:
        return sum(1 for s in self.seen if SELECT_ANALYSIS.match(s))


@pytest.fixture
def statements(db) -> Iterator[Statements]:
    counter = Statements()
    event.listen(db.engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(db.engine, "before_cursor_execute", counter)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0)


def cancel_elsewhere(db, job_id: int, reason: str) -> None:
    """Cancel the row as another process would: not through this process's registry."""
    with db.engine.begin() as conn:
        conn.execute(
            update(Analysis)
            .where(Analysis.id == job_id)
            .values(status=Status.CANCELLED, cancel_reason=reason)
        )


def test_counter_sees_a_poll(db, statements, clock):
    """Guards the others: the counter and the pattern do catch a checkpoint's poll."""
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        statements.reset()
        assert cp.poll() is Status.IN_PROGRESS
        assert statements.total == 1
        assert statements.selects == 1


def test_no_statement_while_the_clock_stands_still(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        statements.reset()
        for _ in range(10_000):
            cp()
        assert statements.total == 0, statements.seen
        assert not cp.cancelled


def test_one_select_per_elapsed_interval(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        for advance in (INTERVAL, INTERVAL, 1.5 * INTERVAL, 10 * INTERVAL, INTERVAL):
            clock.advance(advance)
            statements.reset()
            cp()
            assert statements.selects == 1, statements.seen
            assert statements.total == 1, statements.seen
            for _ in range(1000):
                cp()
            assert statements.total == 1, statements.seen


def test_less_than_an_interval_issues_nothing(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        clock.advance(INTERVAL)
        cp()  # a poll: the next one is due one interval from now
        statements.reset()
        for step in (0.5, 0.25, 0.125):  # 0.875 of an interval in all
            clock.advance(step * INTERVAL)
            for _ in range(100):
                cp()
        assert statements.total == 0, statements.seen
        clock.advance(0.125 * INTERVAL)  # exactly one interval after the last poll
        cp()
        assert statements.selects == 1, statements.seen
        assert statements.total == 1, statements.seen


def test_explicit_poll_always_issues_one_select(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        statements.reset()
        for n in range(1, 6):
            assert cp.poll() is Status.IN_PROGRESS
            assert statements.selects == n
            assert statements.total == n
        # A poll restarts the interval: calls right after it read nothing.
        clock.advance(0.5 * INTERVAL)
        statements.reset()
        cp.poll()
        clock.advance(0.75 * INTERVAL)
        cp()
        assert statements.selects == 1, statements.seen


def test_observed_cancellation_is_sticky_and_stops_polling(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        cancel_elsewhere(db, job, "other process")
        statements.reset()
        for _ in range(1000):
            cp()  # not due: the cancel is not seen yet, and nothing is read
        assert statements.total == 0
        assert not cp.cancelled

        clock.advance(INTERVAL)
        with pytest.raises(Cancelled) as info:
            cp()
        assert info.value.job_id == job
        assert info.value.reason == "other process"
        assert statements.selects == 1
        assert statements.total == 1

        statements.reset()
        for _ in range(1000):
            with pytest.raises(Cancelled):
                cp()
        clock.advance(100 * INTERVAL)
        for _ in range(1000):
            with pytest.raises(Cancelled):
                cp()
        assert statements.total == 0, statements.seen
        assert cp.cancelled
    row = db.row(job)
    assert row.status is Status.CANCELLED
    assert row.finished_at is not None


def test_deleted_row_is_seen_at_the_next_poll(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        with db.sessions.begin() as s:
            s.delete(s.get(Analysis, job))
        clock.advance(INTERVAL)
        statements.reset()
        with pytest.raises(Cancelled) as info:
            cp()
        assert info.value.reason == "deleted"
        assert statements.selects == 1
        statements.reset()
        clock.advance(INTERVAL)
        with pytest.raises(Cancelled):
            cp()
        assert statements.total == 0


def test_local_cancel_raises_at_once_without_a_poll(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        cp()
        assert jobs.cancel(job, reason="from this process") is True
        statements.reset()
        for _ in range(100):
            with pytest.raises(Cancelled) as info:
                cp()
            assert info.value.reason == "from this process"
        assert statements.total == 0, statements.seen
    assert db.row(job).status is Status.CANCELLED


def test_local_cancel_where_raises_at_once_without_a_poll(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add(session_id="poll-rate")
    with jobs.run(job) as cp:
        assert jobs.cancel_where(session_id="poll-rate") == 1
        statements.reset()
        with pytest.raises(Cancelled):
            cp()
        with pytest.raises(Cancelled):
            cp()
        assert statements.total == 0, statements.seen


def test_a_job_cancelled_before_start_never_polls(db, statements, clock):
    jobs = db.jobs(clock=clock, interval=INTERVAL)
    job = db.add()
    assert jobs.cancel(job, reason="early")
    with pytest.raises(Cancelled) as info:
        jobs.run(job).__enter__()  # the with statement raises: no body, no checkpoint
    assert info.value.reason == "early"
    statements.reset()
    clock.advance(10 * INTERVAL)
    assert jobs.active() == ()
    assert statements.total == 0, statements.seen

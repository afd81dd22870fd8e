"""The delivery core the task-queue integrations share, driven without any queue."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dbcancel import Cancelled, JobCancelled, JobNotRunnable, Jobs, Status
from dbcancel._delivery import Delivery, Ending
from tests.conftest import Database


@pytest.fixture
def delivery(db: Database) -> Delivery[Jobs]:
    return Delivery(lambda: db.jobs(interval=0.05))


def test_each_ending(db: Database, delivery: Delivery[Jobs]) -> None:
    calls: list[tuple[Any, ...]] = []

    def body(cp: Any, job_id: int, label: str, *, size: int) -> str:
        calls.append((job_id, label, size))
        return label * size

    done = db.add()
    outcome = delivery.deliver(done, body, ("ab",), {"size": 2})
    assert (outcome.ending, outcome.value) == (Ending.COMPLETED, "abab")
    assert calls == [(done, "ab", 2)]

    again = delivery.deliver(done, body, ("ab",), {"size": 2})
    assert (again.ending, again.status) == (Ending.NOT_RUNNABLE, "completed")
    assert isinstance(again.exception(), JobNotRunnable)

    cancelled = db.add()
    delivery.jobs.cancel(cancelled, reason="early")
    early = delivery.deliver(cancelled, body, ("x",), {"size": 1})
    assert (early.ending, early.reason) == (Ending.CANCELLED, "early")
    assert str(early.exception()) == f"Analysis {cancelled!r} was cancelled: early"
    assert isinstance(early.exception(), JobCancelled)

    missing = delivery.deliver(10**6, body, ("x",), {"size": 1})
    assert (missing.ending, missing.reason) == (Ending.CANCELLED, "deleted")
    assert len(calls) == 1  # none of those ran the body

    def boom(cp: Any, job_id: int) -> None:
        raise OSError("disk full")

    failed = db.add()
    outcome = delivery.deliver(failed, boom)
    assert outcome.ending is Ending.FAILED
    assert isinstance(outcome.error, OSError)
    row = db.row(failed)
    assert row is not None
    assert (row.status, row.error, row.attempts) == (Status.FAILED, "OSError: disk full", 1)


def test_a_retry_moves_the_job_back_to_pending_and_runs_it_again(
    db: Database, delivery: Delivery[Jobs]
) -> None:
    runs: list[int] = []

    def flaky(cp: Any, job_id: int) -> int:
        runs.append(job_id)
        if len(runs) == 1:
            raise OSError("transient")
        return len(runs)

    job_id = db.add()
    first = delivery.deliver(job_id, flaky, retry_if=lambda exc: isinstance(exc, OSError))
    assert first.ending is Ending.RETRY
    row = db.row(job_id)
    assert row is not None
    assert (row.status, row.attempts, row.error) == (Status.PENDING, 1, "OSError: transient")
    assert row.finished_at is None
    second = delivery.deliver(job_id, flaky, retry_if=lambda exc: isinstance(exc, OSError))
    assert (second.ending, second.value) == (Ending.COMPLETED, 2)
    row = db.row(job_id)
    assert row is not None
    assert (row.status, row.attempts) == (Status.COMPLETED, 2)


def test_a_cancel_wins_over_a_retry(db: Database, delivery: Delivery[Jobs]) -> None:
    job_id = db.add()

    def cancelled_then_raises(cp: Any, job_id: int) -> None:
        delivery.jobs.cancel(job_id, reason="user deleted it")
        raise OSError("connection closed")  # because of the cancel

    outcome = delivery.deliver(job_id, cancelled_then_raises, retry_if=lambda exc: True)
    assert (outcome.ending, outcome.reason) == (Ending.CANCELLED, "user deleted it")
    assert db.jobs().status(job_id) is Status.CANCELLED

    # Asked for from inside the body after the cancel: refused, and the run ends cancelled.
    other = db.add()
    answers: list[bool | None] = []

    def asks(cp: Any, job_id: int) -> None:
        delivery.jobs.cancel(job_id)
        answers.append(delivery.retry(job_id, OSError("later")))
        cp()

    assert delivery.deliver(other, asks).ending is Ending.CANCELLED
    assert answers == [False]
    assert delivery.retry(other, None) is None  # no run of it in this thread now


def test_busy_and_deferred(db: Database, delivery: Delivery[Jobs]) -> None:
    job_id = db.add()
    inside, release = threading.Event(), threading.Event()
    seen: list[Any] = []

    def long(cp: Any, job_id: int) -> None:
        inside.set()
        release.wait(30)

    thread = threading.Thread(target=lambda: seen.append(delivery.deliver(job_id, long)))
    thread.start()
    try:
        assert inside.wait(30)
        assert delivery.running() == [job_id]
        busy = delivery.deliver(job_id, long)
        assert (busy.ending, busy.status) == (Ending.BUSY, "in_progress")

        later = db.add()
        shutdown = delivery.begin_shutdown()  # the running job is cancelled
        assert shutdown is not None
        shutdown.join(30)
        deferred = delivery.deliver(later, long)
        assert deferred.ending is Ending.DEFERRED
        assert db.jobs().status(later) is Status.PENDING  # untouched, for another worker
    finally:
        release.set()
        thread.join(30)
    assert seen[0].ending is Ending.CANCELLED
    assert seen[0].reason == "worker shutdown"


def test_a_body_that_raises_cancelled_of_another_job_propagates(
    db: Database, delivery: Delivery[Jobs]
) -> None:
    job_id = db.add()

    def other(cp: Any, job_id: int) -> None:
        raise Cancelled(job_id + 1000, "not mine")

    with pytest.raises(Cancelled, match="not mine"):
        delivery.deliver(job_id, other)
    assert delivery.running() == []

"""The runtime's timing decisions and the per-table Health, without a database."""

from __future__ import annotations

import logging
import os
import random
import statistics
import threading
import time
from typing import Any

import pytest

from dbcancel._health import Health
from dbcancel._runtime import JITTER, Runtime, _Table, poll_delay
from dbcancel.backend import JobRow, cancel_payload, end_payload
from dbcancel.checkpoint import MAX_BACKOFF, Checkpoint, backoff
from dbcancel.models import Status


class FakeBackend:
    """Answers the runtime's batched poll from a dict; ``error`` makes it fail."""

    label = "Fake@memory"
    key = ("fake", "jobs")
    worker_key = ("fake",)

    def __init__(self) -> None:
        self.rows: dict[Any, JobRow] = {}
        self.error: Exception | None = None
        self.batches: list[set[Any]] = []
        self.beats: list[str] = []

    def listener(self) -> None:
        return None

    def read_many(self, job_ids: Any) -> dict[Any, JobRow]:
        self.batches.append(set(job_ids))
        if self.error is not None:
            raise self.error
        return {i: self.rows[i] for i in job_ids if i in self.rows}

    def beat_worker(self, worker_id: str) -> None:
        self.beats.append(worker_id)

    def release(self) -> None:
        pass


def watched(job_id: int, **kwargs: Any) -> Checkpoint:
    return Checkpoint(None, job_id, interval=1.0, clock=time.monotonic, watched=True, **kwargs)  # type: ignore[arg-type]


def table_of(backend: FakeBackend, *cps: Checkpoint) -> _Table:
    table = _Table(backend, Health("t"))  # type: ignore[arg-type]
    table.watched.update(dict.fromkeys(cps, 1))
    return table


def test_waits_carry_jitter_around_the_interval():
    delays = [poll_delay(2.0, 0) for _ in range(2000)]
    assert min(delays) >= 2.0 * (1 - JITTER)
    assert max(delays) <= 2.0 * (1 + JITTER)
    assert statistics.pstdev(delays) > 0.05  # not lockstep
    assert abs(statistics.fmean(delays) - 2.0) < 0.02  # one poll per interval on average


def test_jitter_leaves_the_global_random_state_alone():
    """The runtime thread draws while the application runs: a seeded global ``random``
    (an app's, or hypothesis generating data) must not move."""
    random.seed(1234)
    before = random.getstate()
    for _ in range(100):
        poll_delay(2.0, 0)
    assert random.getstate() == before


def test_a_forked_child_jitters_differently():
    from dbcancel._random import rng

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, repr(rng.random()).encode())
        os._exit(0)
    os.close(write)
    child = float(os.read(read, 100).decode())
    os.close(read)
    os.waitpid(pid, 0)
    assert child != rng.random()


def test_failing_polls_back_off_up_to_the_cap():
    delays = [poll_delay(0.5, failures) for failures in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]


def test_the_threadless_and_watched_polls_share_one_backoff_rule():
    for failures in range(1, 8):
        assert poll_delay(0.5, failures) == backoff(0.5, failures)


def test_backoff_never_oversleeps_a_max_staleness_deadline():
    assert poll_delay(1.0, 10, stale_in=2.0) <= 2.0


def test_one_batch_for_all_jobs_and_rows_reach_their_checkpoints():
    backend = FakeBackend()
    cps = [watched(i) for i in range(100)]
    table = table_of(backend, *cps)
    backend.rows = {i: JobRow(Status.IN_PROGRESS, None, None) for i in range(100)}
    backend.rows[7] = JobRow(Status.CANCELLED, "stop", None)
    del backend.rows[9]  # deleted
    Runtime()._poll(table)
    assert backend.batches == [set(range(100))]
    assert [cp.job_id for cp in cps if cp.cancelled] == [7, 9]
    assert (cps[7].reason, cps[9].reason) == ("stop", "deleted")


def test_a_job_that_left_during_the_poll_gets_nothing():
    backend = FakeBackend()
    cp = watched(1)
    table = table_of(backend, cp)

    def read_many(job_ids: Any) -> dict[Any, JobRow]:
        table.watched.pop(cp)  # the job ends, and its row is deleted, while the poll runs
        return {}

    backend.read_many = read_many  # type: ignore[method-assign]
    Runtime()._poll(table)
    assert not cp.cancelled


def test_a_failed_batch_counts_once_and_cancels_stale_jobs(caplog):
    backend = FakeBackend()
    fresh, stale = watched(1), watched(2, max_staleness=1e-9)
    table = table_of(backend, fresh, stale)
    health = table.health
    backend.error = ConnectionError("down")
    caplog.set_level(logging.WARNING, logger="dbcancel")
    runtime = Runtime()
    runtime._poll(table)
    runtime._poll(table)
    assert (health.polls, health.poll_errors) == (2, 2)
    assert health.outage() is not None
    assert stale.cancelled
    assert stale._local
    assert not fresh.cancelled
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1

    backend.error = None
    backend.rows = {1: JobRow(Status.IN_PROGRESS, None, None)}
    runtime._poll(table)
    assert health.outage() is None
    assert health.last_outage is not None
    assert table.failures == 0


@pytest.mark.parametrize("payloads", [["*"], ["5"], ["1", "*"], ['["5"']])
def test_notifications_that_ask_for_a_poll(payloads):
    """``*`` (cancel_where) and a bare id of a watched job: poll, cancel nothing."""
    five, six = watched(5), watched(6)
    table = table_of(FakeBackend(), five, six)
    table.due = 1e9
    if payloads == ['["5"']:
        payloads = ['["5"', cancel_payload(7, "not ours")]
    Runtime()._dispatch([table], [(None, p) for p in payloads])
    assert not five.cancelled
    assert not six.cancelled
    assert table.due == 0.0  # a poll at once
    table.due = 1e9
    Runtime()._dispatch([table], [(None, end_payload(5))])
    assert table.due == 1e9  # an end wakes waiters only


def test_a_notification_naming_the_job_cancels_it_without_a_poll():
    """A payload is sent only by a committed cancel that changed the row: as good as it."""
    backend = FakeBackend()
    five, six = watched(5), watched(6)
    table = table_of(backend, five, six)
    table.due = 1e9
    Runtime()._dispatch([table], [(None, cancel_payload(5, "user left"))])
    assert (five.cancelled, five.reason) == (True, "user left")
    assert not six.cancelled
    assert backend.batches == []
    assert table.due == 1e9


def test_notifications_wake_the_waiters_they_name():
    table = table_of(FakeBackend())
    five, six, other = threading.Event(), threading.Event(), threading.Event()
    table.waiters = {"5": {five}, "6": {six}}
    Runtime()._dispatch([table], [(None, end_payload(5))])
    assert five.is_set()
    assert not six.is_set()
    Runtime()._dispatch([table], [(None, end_payload(None))])  # a reap: every waiter
    assert six.is_set()
    table.waiters = {"7": {other}}
    Runtime()._dispatch([table], [(None, cancel_payload(7, "why"))])
    assert other.is_set()


class NoListenBackend(FakeBackend):
    """A PostgreSQL engine whose driver cannot LISTEN: its listener() refuses."""

    def listener(self) -> None:
        raise TypeError("this driver cannot listen")


def test_a_backend_that_cannot_listen_is_polled_without_a_listener():
    table = _Table(NoListenBackend(), Health("t"))  # type: ignore[arg-type]
    assert table.listener is None


def test_a_job_with_a_shorter_interval_is_polled_within_its_own():
    runtime = Runtime()
    backend = FakeBackend()
    long = Checkpoint(None, 1, interval=60.0, clock=time.monotonic, watched=True)  # type: ignore[arg-type]
    short = Checkpoint(None, 2, interval=0.05, clock=time.monotonic, watched=True)  # type: ignore[arg-type]
    try:
        runtime.watch(backend, Health("t"), long)  # type: ignore[arg-type]
        time.sleep(0.2)  # the thread is now in a wait planned for 60 s
        polled = len(backend.batches)
        runtime.watch(backend, Health("t"), short)  # type: ignore[arg-type]
        deadline = time.monotonic() + 5.0  # generous: about 0.05 s
        while len(backend.batches) == polled:
            assert time.monotonic() < deadline, "the short job was not polled"
            time.sleep(0.01)
    finally:
        assert runtime.stop(5.0)

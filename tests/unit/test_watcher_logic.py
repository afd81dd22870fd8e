"""The watcher's timing decisions and the per-table Health, without a database."""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from typing import Any

import pytest

from dbcancel._health import Health
from dbcancel._watcher import JITTER, Watcher
from dbcancel.backend import JobRow, cancel_payload
from dbcancel.checkpoint import MAX_BACKOFF, Checkpoint
from dbcancel.models import Status


class FakeBackend:
    """Answers the watcher's batched poll from a dict; ``error`` makes it fail."""

    label = "Fake@memory"

    def __init__(self) -> None:
        self.rows: dict[Any, JobRow] = {}
        self.error: Exception | None = None
        self.batches: list[set[Any]] = []

    def listener(self) -> None:
        return None

    def read_many(self, job_ids: Any) -> dict[Any, JobRow]:
        self.batches.append(set(job_ids))
        if self.error is not None:
            raise self.error
        return {i: self.rows[i] for i in job_ids if i in self.rows}


def watched(job_id: int, **kwargs: Any) -> Checkpoint:
    return Checkpoint(None, job_id, interval=1.0, clock=time.monotonic, watched=True, **kwargs)  # type: ignore[arg-type]


def test_waits_carry_jitter_around_the_interval():
    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    delays = [watcher._next_delay(2.0) for _ in range(2000)]
    assert min(delays) >= 2.0 * (1 - JITTER)
    assert max(delays) <= 2.0 * (1 + JITTER)
    assert statistics.pstdev(delays) > 0.05  # not lockstep
    assert abs(statistics.fmean(delays) - 2.0) < 0.02  # one poll per interval on average


def test_jitter_leaves_the_global_random_state_alone():
    """The watcher and heartbeat threads draw while the application runs: a seeded
    global ``random`` (an app's, or hypothesis generating data) must not move."""
    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    random.seed(1234)
    before = random.getstate()
    for _ in range(100):
        watcher._next_delay(2.0)
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
    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    delays = []
    for failures in range(1, 8):
        watcher._failures = failures
        delays.append(watcher._next_delay(0.5))
    assert delays == [0.5, 1.0, 2.0, 4.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]


def test_backoff_never_oversleeps_a_max_staleness_deadline():
    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    cp = watched(1, max_staleness=2.0)
    watcher._watched[cp] = 1
    watcher._failures = 10
    assert watcher._next_delay(1.0) <= 2.0


def test_one_batch_for_all_jobs_and_rows_reach_their_checkpoints():
    backend = FakeBackend()
    watcher = Watcher(backend, Health("t"))  # type: ignore[arg-type]
    cps = [watched(i) for i in range(100)]
    watcher._watched.update(dict.fromkeys(cps, 1))
    backend.rows = {i: JobRow(Status.IN_PROGRESS, None, None) for i in range(100)}
    backend.rows[7] = JobRow(Status.CANCELLED, "stop", None)
    del backend.rows[9]  # deleted
    watcher._poll()
    assert backend.batches == [set(range(100))]
    assert [cp.job_id for cp in cps if cp.cancelled] == [7, 9]
    assert (cps[7].reason, cps[9].reason) == ("stop", "deleted")


def test_a_job_that_left_during_the_poll_gets_nothing():
    backend = FakeBackend()
    watcher = Watcher(backend, Health("t"))  # type: ignore[arg-type]
    cp = watched(1)
    watcher._watched[cp] = 1

    def read_many(job_ids: Any) -> dict[Any, JobRow]:
        watcher.remove(cp)  # the job ends, and its row is deleted, while the poll runs
        return {}

    backend.read_many = read_many  # type: ignore[method-assign]
    watcher._poll()
    assert not cp.cancelled


def test_a_failed_batch_counts_once_and_cancels_stale_jobs(caplog):
    backend = FakeBackend()
    health = Health("t")
    watcher = Watcher(backend, health)  # type: ignore[arg-type]
    fresh, stale = watched(1), watched(2, max_staleness=1e-9)
    watcher._watched.update(dict.fromkeys([fresh, stale], 1))
    backend.error = ConnectionError("down")
    caplog.set_level(logging.WARNING, logger="dbcancel")
    watcher._poll()
    watcher._poll()
    assert (health.polls, health.poll_errors) == (2, 2)
    assert health.outage() is not None
    assert stale.cancelled
    assert stale._local
    assert not fresh.cancelled
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1

    backend.error = None
    backend.rows = {1: JobRow(Status.IN_PROGRESS, None, None)}
    watcher._poll()
    assert health.outage() is None
    assert health.last_outage is not None
    assert watcher._failures == 0


@pytest.mark.parametrize("payloads", [["*"], ["5"], ["1", "*"], ['["5"']])
def test_notifications_that_ask_for_a_poll(payloads):
    """``*`` (cancel_where) and a bare or garbled id of a watched job: poll, cancel nothing."""
    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    five, six = watched(5), watched(6)
    watcher._watched.update(dict.fromkeys([five, six], 1))
    if payloads == ['["5"']:
        payloads = ['["5"', cancel_payload(7, "not ours")]
        assert not watcher._take_notifications(payloads)  # garbled, and not about 5
    else:
        assert watcher._take_notifications(payloads)
    assert not five.cancelled
    assert not six.cancelled
    assert not watcher._take_notifications(["7", "8"])


def test_a_notification_naming_the_job_cancels_it_without_a_poll():
    """A payload is sent only by a committed cancel that changed the row: as good as it."""
    backend = FakeBackend()
    watcher = Watcher(backend, Health("t"))  # type: ignore[arg-type]
    five, six = watched(5), watched(6)
    watcher._watched.update(dict.fromkeys([five, six], 1))
    assert not watcher._take_notifications([cancel_payload(5, "user left")])
    assert (five.cancelled, five.reason) == (True, "user left")
    assert not six.cancelled
    assert backend.batches == []


class NoListenBackend(FakeBackend):
    """A PostgreSQL engine whose driver cannot LISTEN: its listener() refuses."""

    def listener(self) -> None:
        raise TypeError("this driver cannot listen")


def test_a_backend_that_cannot_listen_is_polled_without_a_listener():
    watcher = Watcher(NoListenBackend(), Health("t"))  # type: ignore[arg-type]
    assert watcher._listener is None
    assert watcher.listening is False


def test_the_threadless_and_watched_polls_share_one_backoff_rule():
    from dbcancel.checkpoint import backoff

    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    for failures in range(1, 8):
        watcher._failures = failures
        assert watcher._next_delay(0.5) == backoff(0.5, failures)


def test_a_job_with_a_shorter_interval_cuts_the_planned_wait():
    watcher = Watcher(FakeBackend(), Health("t"))  # type: ignore[arg-type]
    long = Checkpoint(None, 1, interval=60.0, clock=time.monotonic, watched=True)  # type: ignore[arg-type]
    short = Checkpoint(None, 2, interval=0.05, clock=time.monotonic, watched=True)  # type: ignore[arg-type]
    watcher._watched[long] = 1
    assert watcher._wait_for_jobs() == 60.0
    watcher._watched[short] = 1
    watcher._shorter = True  # what add() sets for a shorter interval than the plan's
    started = time.monotonic()
    watcher._wait(60.0)
    assert time.monotonic() - started < 5.0  # cut to about 0.05 s, bound generous

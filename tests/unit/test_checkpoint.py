"""The checkpoint's logic on its own: no database, a fake of the library's own seam.

``Checkpoint`` talks to whatever created it through ``_Source`` in
``dbcancel/checkpoint.py``: ``_poll_rows(job_ids)`` (its poll, a batch of one),
``_complete_in(job_id, using)``, ``_runtime_add(cp)``/``_runtime_remove(cp)`` and
``_beat_due()``. ``FakeSource`` implements the first two (the rest do nothing: these
checkpoints are threadless, no runtime thread serves them), so these tests pin down
throttling, stickiness, callbacks, error handling and thread safety without any SQL.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import pickle
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbcancel
from dbcancel import Cancelled, Checkpoint, InvalidTransition, JobNotFound, Status
from dbcancel.testing import FakeClock

JOB = 7


class FakeSource:
    """Stands in for ``Jobs`` behind a checkpoint: the row is two attributes."""

    def __init__(self, status: Status | None = Status.IN_PROGRESS, reason: str | None = None):
        self.status = status
        self.reason = reason
        self.error: Exception | None = None
        self.polls = 0
        self.complete_calls: list[Any] = []
        self.complete_answer: tuple[Status | None, str | None] | None = None
        # Set by tests that need to hold a poll half-way (see the concurrency tests).
        self.polling: threading.Event | None = None
        self.release: threading.Event | None = None

    def _poll_rows(self, job_ids: Any) -> dict[Any, tuple[Status, str | None]]:
        assert set(job_ids) == {JOB}
        self.polls += 1
        # The row is read before the hold: whatever happens meanwhile, the answer is stale.
        answer = (self.status, self.reason)
        if self.polling is not None and self.release is not None:
            self.polling.set()
            assert self.release.wait(10), "the test never released the held poll"
        if self.error is not None:
            raise self.error
        status, reason = answer
        return {} if status is None else {JOB: (status, reason)}

    def _complete_in(self, job_id: Any, using: Any) -> tuple[Status | None, str | None] | None:
        assert job_id == JOB
        self.complete_calls.append(using)
        return self.complete_answer

    def _runtime_add(self, cp: Checkpoint) -> None:
        pass

    def _runtime_remove(self, cp: Checkpoint) -> None:
        pass

    def _beat_due(self) -> None:
        pass


def make(
    source: FakeSource | None = None, *, interval: float = 1.0, **kwargs: Any
) -> tuple[Checkpoint, FakeSource, FakeClock]:
    source = source if source is not None else FakeSource()
    clock = FakeClock()
    cp = Checkpoint(source, JOB, interval=interval, clock=clock, **kwargs)
    return cp, source, clock


def dbcancel_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dbcancel"]


# -- throttling -----------------------------------------------------------------------


def test_no_poll_while_the_clock_stands_still():
    cp, source, _ = make()
    for _ in range(10_000):
        cp()
    assert source.polls == 0
    assert not cp.cancelled
    assert cp.job_id == JOB
    assert cp.reason is None
    assert cp.interval == 1.0


def test_one_poll_per_interval():
    cp, source, clock = make(interval=1.0)
    for expected in range(1, 6):
        clock.advance(1.0)
        cp()
        assert source.polls == expected
        for _ in range(100):
            cp()
        assert source.polls == expected


def test_less_than_an_interval_does_not_poll():
    cp, source, clock = make(interval=1.0)
    clock.advance(0.5)
    cp()
    clock.advance(0.25)
    cp()
    assert source.polls == 0
    clock.advance(0.25)  # now exactly one interval after creation
    cp()
    assert source.polls == 1
    clock.advance(0.75)  # the next poll is due one interval after the last one
    cp()
    assert source.polls == 1
    clock.advance(0.25)
    cp()
    assert source.polls == 2


def test_explicit_poll_always_reads_and_restarts_the_interval():
    cp, source, clock = make(interval=1.0)
    for n in range(1, 4):
        assert cp.poll() is Status.IN_PROGRESS
        assert source.polls == n
    clock.advance(0.75)
    assert cp.poll() is Status.IN_PROGRESS
    assert source.polls == 4
    clock.advance(0.5)  # 1.25 after creation, but only 0.5 after the last poll
    cp()
    assert source.polls == 4
    clock.advance(0.5)
    cp()
    assert source.polls == 5


# Steps are multiples of 1/8 so that the float sums are exact.
steps = st.lists(st.tuples(st.integers(0, 24).map(lambda n: n / 8), st.integers(0, 3)), max_size=60)


@settings(max_examples=200, deadline=None, database=None)
@given(steps=steps, interval_eighths=st.integers(1, 16))
def test_poll_count_matches_the_throttle_rule(steps, interval_eighths):
    """A poll happens exactly when a call finds the clock at or past the last poll + interval."""
    interval = interval_eighths / 8
    cp, source, clock = make(interval=interval)
    due = clock() + interval
    expected = 0
    for advance, calls in steps:
        clock.advance(advance)
        for _ in range(calls):
            if clock() >= due:
                expected += 1
                due = clock() + interval
            cp()
        assert source.polls == expected


# -- cancellation ---------------------------------------------------------------------


def test_cancelled_row_raises_and_stays_raised():
    cp, source, clock = make()
    source.status, source.reason = Status.CANCELLED, "user deleted the session"
    cp()  # not due yet: nothing read, nothing raised
    assert not cp.cancelled
    clock.advance(1.0)
    with pytest.raises(Cancelled) as info:
        cp()
    assert info.value.job_id == JOB
    assert info.value.reason == "user deleted the session"
    assert cp.cancelled
    assert cp.reason == "user deleted the session"
    assert source.polls == 1

    # Sticky: even a row that claims otherwise, and a moving clock, change nothing, and no
    # further poll is made.
    source.status, source.reason = Status.IN_PROGRESS, None
    for _ in range(50):
        clock.advance(1.0)
        with pytest.raises(Cancelled):
            cp()
    assert source.polls == 1
    assert cp.cancelled


def test_poll_of_a_cancelled_row_does_not_raise_but_observes():
    cp, source, _ = make()
    source.status, source.reason = Status.CANCELLED, "stop"
    assert cp.poll() is Status.CANCELLED
    assert cp.cancelled
    assert cp.reason == "stop"
    with pytest.raises(Cancelled):
        cp()


def test_deleted_row_counts_as_cancelled():
    cp, source, clock = make()
    source.status = None
    clock.advance(1.0)
    with pytest.raises(Cancelled) as info:
        cp()
    assert info.value.reason == "deleted"
    assert cp.reason == "deleted"
    assert cp.cancelled

    cp2, source2, _ = make()
    source2.status = None
    assert cp2.poll() is Status.CANCELLED
    assert cp2.reason == "deleted"


def test_first_reason_wins():
    cp, source, clock = make()
    cp._observe("first")
    cp._observe("second")
    assert cp.reason == "first"
    source.status, source.reason = Status.CANCELLED, "third"
    cp.poll()
    assert cp.reason == "first"
    source.status = None
    cp.poll()
    assert cp.reason == "first"
    clock.advance(5)
    with pytest.raises(Cancelled) as info:
        cp()
    assert info.value.reason == "first"


def test_created_cancelled_raises_on_the_first_call_without_polling():
    cp, source, _ = make(cancelled=True, reason="before start")
    assert cp.cancelled
    assert cp.reason == "before start"
    with pytest.raises(Cancelled) as info:
        cp()
    assert info.value.reason == "before start"
    assert source.polls == 0


def test_local_observe_raises_on_the_next_call_without_polling():
    cp, source, _ = make()
    cp()
    cp._observe(None)
    with pytest.raises(Cancelled) as info:
        cp()
    assert info.value.reason is None
    assert source.polls == 0


def test_repr_says_whether_cancelled():
    cp, _, _ = make()
    assert "running" in repr(cp)
    cp._observe("why")
    assert "cancelled" in repr(cp)
    assert "why" in repr(cp)


# -- callbacks ------------------------------------------------------------------------


def test_on_cancel_runs_once_in_registration_order():
    cp, source, clock = make()
    calls: list[str] = []
    cp.on_cancel(lambda: calls.append("a"))
    cp.on_cancel(lambda: calls.append("b"))
    cp.on_cancel(lambda: calls.append("c"))
    assert calls == []
    source.status = Status.CANCELLED
    clock.advance(1.0)
    with pytest.raises(Cancelled):
        cp()
    assert calls == ["a", "b", "c"]
    cp._observe("again")
    cp.poll()
    with pytest.raises(Cancelled):
        cp()
    assert calls == ["a", "b", "c"]


def test_on_cancel_runs_at_once_when_already_cancelled():
    cp, _, _ = make(cancelled=True)
    calls: list[int] = []
    cp.on_cancel(lambda: calls.append(1))
    assert calls == [1]
    cp.on_cancel(lambda: calls.append(2))
    assert calls == [1, 2]
    cp._observe("later")
    assert calls == [1, 2]


def test_failing_callback_is_logged_and_does_not_stop_the_others(caplog):
    cp, _, _ = make()
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise ValueError("socket already closed")

    cp.on_cancel(lambda: calls.append("first"))
    cp.on_cancel(broken)
    cp.on_cancel(lambda: calls.append("last"))
    with caplog.at_level(logging.DEBUG, logger="dbcancel"):
        cp._observe("stop")
    assert calls == ["first", "broken", "last"]
    errors = [r for r in dbcancel_records(caplog) if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], ValueError)
    assert str(JOB) in errors[0].getMessage()

    # Registering a failing callback after the fact logs too, and does not raise.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dbcancel"):
        cp.on_cancel(broken)
    assert calls[-1] == "broken"
    assert len([r for r in dbcancel_records(caplog) if r.levelno >= logging.ERROR]) == 1


def test_handle_remove_unregisters():
    cp, _, _ = make()
    calls: list[str] = []
    keep = cp.on_cancel(lambda: calls.append("keep"))
    gone = cp.on_cancel(lambda: calls.append("gone"))
    gone.remove()
    gone.remove()  # harmless twice
    cp._observe(None)
    assert calls == ["keep"]
    keep.remove()  # harmless after it ran
    gone.remove()
    assert calls == ["keep"]


def test_handle_as_context_manager_unregisters_on_exit():
    cp, _, _ = make()
    calls: list[str] = []
    with cp.on_cancel(lambda: calls.append("inside")) as handle:
        assert isinstance(handle, dbcancel.CallbackHandle)
    cp.on_cancel(lambda: calls.append("outside"))
    cp._observe(None)
    assert calls == ["outside"]


def test_callback_inside_its_with_block_runs():
    cp, _, _ = make()
    calls: list[str] = []
    with cp.on_cancel(lambda: calls.append("ran")):
        cp._observe(None)
    assert calls == ["ran"]


# -- failing polls --------------------------------------------------------------------


def test_failing_poll_is_logged_once_per_outage_and_recovery_is_logged(caplog):
    cp, source, clock = make(interval=1.0)
    source.error = ConnectionError("database unreachable")
    with caplog.at_level(logging.DEBUG, logger="dbcancel"):
        for _ in range(10):
            clock.advance(1.0)
            for _ in range(100):
                cp()  # never raises into the worker's loop
        # Throttled during the outage, and backing off: attempts at 1, 2, 4 and 8 s.
        assert source.polls == 4
        failed = [r for r in dbcancel_records(caplog) if "retrying" in r.getMessage()]
        assert len(failed) == 1
        assert failed[0].levelno >= logging.WARNING
        assert failed[0].exc_info is not None
        assert isinstance(failed[0].exc_info[1], ConnectionError)
        assert not any("works again" in r.getMessage() for r in dbcancel_records(caplog))

        source.error = None
        clock.advance(3.0)  # t=13: the backoff is capped at MAX_BACKOFF (5 s) after t=8
        cp()
        assert source.polls == 5
        clock.advance(1.0)
        cp()
        again = [r for r in dbcancel_records(caplog) if "works again" in r.getMessage()]
        assert len(again) == 1
        assert "4 failed polls" in again[0].getMessage()

        # A second outage is a new outage: logged once more.
        source.error = ConnectionError("down again")
        for _ in range(5):
            clock.advance(1.0)
            cp()
        failed = [r for r in dbcancel_records(caplog) if "retrying" in r.getMessage()]
        assert len(failed) == 2
    assert not cp.cancelled


def test_backoff_is_capped_and_resets_after_a_successful_poll():
    cp, source, clock = make(interval=0.5)
    source.error = ConnectionError("down")
    attempts: list[float] = []
    for _ in range(200):
        clock.advance(0.25)  # exact in binary: due times are hit exactly
        before = source.polls
        cp()
        if source.polls > before:
            attempts.append(round(clock(), 2))
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(attempts)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert set(gaps[4:]) == {5.0}  # MAX_BACKOFF
    source.error = None
    clock.advance(5.0)
    cp()
    polls = source.polls
    clock.advance(0.5)
    cp()
    assert source.polls == polls + 1  # back to one poll per interval


def test_max_staleness_cancels_locally_after_that_long_without_a_good_poll():
    cp, source, clock = make(interval=1.0, max_staleness=10.0)
    calls: list[str] = []
    cp.on_cancel(lambda: calls.append("ran"))
    clock.advance(1.0)
    cp()  # a good poll at t=1
    source.error = ConnectionError("down")
    for _ in range(9):
        clock.advance(1.0)
        cp()
    assert not cp.cancelled  # t=10: 9 s since the last good poll
    clock.advance(1.0)
    with pytest.raises(Cancelled) as info:
        cp()  # t=11: due exactly then, whatever the backoff says
    assert cp.cancelled
    assert cp._local
    assert "max_staleness=10.0s" in (cp.reason or "")
    assert info.value.reason == cp.reason
    assert calls == ["ran"]


def test_without_max_staleness_an_outage_never_cancels():
    cp, source, clock = make(interval=1.0)
    source.error = ConnectionError("down")
    for _ in range(1000):
        clock.advance(1.0)
        cp()
    assert not cp.cancelled


def test_observed_at_is_set_once_when_the_cancel_is_seen():
    cp, _, _ = make()
    assert cp.observed_at is None
    cp._observe("first")
    first = cp.observed_at
    assert first is not None
    assert first.tzinfo is not None
    cp._observe("second")
    assert cp.observed_at == first


def test_a_watched_checkpoint_only_reads_its_flag():
    cp, source, clock = make(watched=True)
    assert cp.watched
    for _ in range(100):
        clock.advance(10.0)
        cp()
    assert source.polls == 0
    calls: list[str] = []
    cp.on_cancel(lambda: calls.append("ran"))
    cp._apply_row(Status.CANCELLED, "from the watcher")
    with pytest.raises(Cancelled) as info:
        cp()
    assert info.value.reason == "from the watcher"
    assert info.value.job_id == JOB
    assert calls == ["ran"]
    with pytest.raises(Cancelled):
        cp()  # sticky


def test_cancellation_is_seen_after_an_outage():
    cp, source, clock = make()
    source.error = OSError("gone")
    clock.advance(1.0)
    cp()
    source.error = None
    source.status = Status.CANCELLED
    clock.advance(1.0)
    with pytest.raises(Cancelled):
        cp()


def test_explicit_poll_propagates_the_error():
    cp, source, _ = make()
    source.error = ConnectionError("database unreachable")
    with pytest.raises(ConnectionError):
        cp.poll()
    assert not cp.cancelled


def test_failing_poll_after_local_cancel_still_raises_cancelled():
    cp, source, _ = make()
    source.error = ConnectionError("down")
    cp._observe("local")
    with pytest.raises(Cancelled):
        cp()
    assert source.polls == 0


# -- complete() -----------------------------------------------------------------------


def test_complete_accepted():
    cp, source, _ = make()
    session = object()
    cp.complete(session)
    assert source.complete_calls == [session]
    assert not cp.cancelled


@pytest.mark.parametrize(
    ("answer", "reason"),
    [((Status.CANCELLED, "too late"), "too late"), ((None, None), "deleted")],
)
def test_complete_refused_raises_cancelled(answer, reason):
    cp, source, _ = make()
    calls: list[int] = []
    cp.on_cancel(lambda: calls.append(1))
    source.complete_answer = answer
    with pytest.raises(Cancelled) as info:
        cp.complete(object())
    assert info.value.reason == reason
    assert cp.cancelled
    assert cp.reason == reason
    assert calls == [1]


def test_complete_after_cancel_raises_without_touching_the_source():
    cp, source, _ = make()
    cp._observe("stop")
    with pytest.raises(Cancelled):
        cp.complete(object())
    assert source.complete_calls == []


# -- concurrency ----------------------------------------------------------------------


def test_observe_during_a_poll_is_not_lost():
    """A cancel observed while a stale poll is in flight must not be undone by it.

    The worker is inside ``cp.poll()`` (which never raises) when another thread observes
    the cancellation. The poll then returns the stale ``in_progress``; the worker's very
    next ``cp()`` must raise, although the clock never moves (so a reset of the poll
    deadline would hide the cancel for ever).
    """
    cp, source, _ = make(interval=1.0)
    source.polling, source.release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            outcome["poll"] = cp.poll()
            source.polling = source.release = None
            for n in range(1, 1001):
                try:
                    cp()
                except Cancelled:
                    outcome["raised_at"] = n
                    return
            outcome["raised_at"] = None
        except BaseException as exc:  # pragma: no cover - reported below
            outcome["error"] = exc

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    assert source.polling.wait(10)
    cp._observe("cancelled meanwhile")
    source.release.set()
    t.join(10)
    assert not t.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["poll"] is Status.IN_PROGRESS  # the stale read
    assert outcome["raised_at"] == 1
    assert cp.reason == "cancelled meanwhile"


def test_worker_raises_within_a_bounded_number_of_calls_after_observe():
    """A free-running worker, polling on almost every call, against a concurrent cancel."""
    for round_ in range(20):
        source = FakeSource()
        # A real clock and a tiny interval: nearly every call polls (and resets the
        # deadline), which is exactly what a cancel from another thread races against.
        cp = Checkpoint(source, JOB, interval=1e-7, clock=time.monotonic)
        running, observed = threading.Event(), threading.Event()
        outcome: dict[str, Any] = {}

        def worker(cp: Checkpoint = cp, running=running, observed=observed, outcome=outcome):
            after = 0
            try:
                for _ in range(5_000_000):
                    seen = observed.is_set()
                    running.set()
                    cp()
                    if seen:
                        after += 1
                outcome["raised"] = False
            except Cancelled:
                outcome["raised"] = True
            outcome["calls_after_observe"] = after

        t = threading.Thread(target=worker, daemon=True)
        t.start()
        assert running.wait(10)
        # Let the worker poll a few times before the cancel lands.
        deadline = time.monotonic() + 5
        while source.polls < 10 + 50 * round_ and time.monotonic() < deadline:
            time.sleep(0)  # yield the GIL; this is pacing, not synchronisation
        cp._observe("race")
        observed.set()
        t.join(10)
        assert not t.is_alive()
        assert outcome["raised"], f"round {round_}: the worker never raised"
        # Calls that began after _observe returned: the first of them must raise.
        assert outcome["calls_after_observe"] == 0, (round_, outcome)


def test_cancel_from_another_thread_runs_callbacks_there():
    cp, _, _ = make()
    ran_in: list[str] = []
    cp.on_cancel(lambda: ran_in.append(threading.current_thread().name))
    t = threading.Thread(target=cp._observe, args=("x",), name="canceller", daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert ran_in == ["canceller"]
    with pytest.raises(Cancelled):
        cp()


# -- errors ---------------------------------------------------------------------------


def test_cancelled_is_a_base_exception_not_an_exception():
    assert issubclass(Cancelled, BaseException)
    assert not issubclass(Cancelled, Exception)

    def per_file_loop() -> None:
        try:
            raise Cancelled(1, "r")
        except Exception:  # the broad handler of a per-file loop  # pragma: no cover
            pytest.fail("except Exception swallowed Cancelled")

    with pytest.raises(Cancelled):
        per_file_loop()


@pytest.mark.parametrize("reason", [None, "user deleted the session", "", "ü ✓"])
@pytest.mark.parametrize("job_id", [1, "a1b2", 2**70])
def test_cancelled_pickles(job_id, reason):
    exc = Cancelled(job_id, reason)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is Cancelled
    assert copy.job_id == job_id
    assert copy.reason == reason
    assert str(copy) == str(exc)
    assert repr(job_id) in str(exc)
    if reason:
        assert reason in str(exc)


def test_other_errors_pickle():
    nf = JobNotFound("Analysis", 3, {"user_id": "bob"})
    nf2 = pickle.loads(pickle.dumps(nf))
    assert (nf2.model, nf2.job_id, nf2.where, str(nf2)) == ("Analysis", 3, nf.where, str(nf))
    it = InvalidTransition("Analysis", 3, "completed", "in_progress")
    it2 = pickle.loads(pickle.dumps(it))
    assert (it2.current, it2.wanted, str(it2)) == ("completed", "in_progress", str(it))
    for text in ("Analysis", "3", "completed", "in_progress"):
        assert text in str(it)
    assert isinstance(nf, dbcancel.DbcancelError)
    assert isinstance(it, dbcancel.DbcancelError)
    read = pickle.loads(pickle.dumps(JobNotFound("Analysis", 3, changing=False)))
    assert (read.changing, str(read)) == (False, "Analysis 3 not found")
    running = InvalidTransition("Analysis", 3, "in_progress", "in_progress", "h:12:ab")
    running2 = pickle.loads(pickle.dumps(running))
    assert (running2.worker, str(running2)) == ("h:12:ab", str(running))
    assert "already running in worker h:12:ab" in str(running)


# -- the context functions ------------------------------------------------------------


def test_module_checkpoint_is_a_no_op_outside_a_job():
    assert dbcancel.current() is None
    for _ in range(1000):
        assert dbcancel.checkpoint() is None
    # Also in a fresh context and in another thread.
    assert contextvars.Context().run(dbcancel.current) is None
    seen: list[object] = []
    t = threading.Thread(
        target=lambda: (dbcancel.checkpoint(), seen.append(dbcancel.current())), daemon=True
    )
    t.start()
    t.join(10)
    assert seen == [None]

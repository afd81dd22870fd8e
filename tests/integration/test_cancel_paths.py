"""Every way a cancel reaches a running job, and what the job leaves behind.

Threads are daemons joined with timeouts and child processes are killed at teardown, so a
bug fails a test instead of hanging the suite. Bounds are generous ("interval + 5 s"):
the precise latencies are measured by the benchmark, not here.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, text, update

import dbcancel
from dbcancel import Cancelled, JobNotFound, Jobs, Status
from tests.models import Analysis, Result

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 0.05  # what db.jobs() uses
MARGIN = 5.0  # generous: these tests check that the cancel arrives, not how fast
TABLE = Analysis.__table__


# -- helpers -------------------------------------------------------------------------------


def read_row(db: Any, job: int) -> dict[str, Any] | None:
    with db.engine.connect() as conn:
        row = conn.execute(select(TABLE).where(TABLE.c.id == job)).mappings().first()
    return None if row is None else dict(row)


def results_of(db: Any, job: int) -> list[str]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(Result.value).where(Result.analysis_id == job).order_by(Result.id)
        )
        return list(rows.scalars())


def work() -> None:
    """A small piece of CPU work: one "item" of a worker loop."""
    sum(i * i for i in range(300))


def start_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


class LoopWorker:
    """A worker thread: ``with jobs.run(job) as cp: while True: cp(); work()``.

    Records the checkpoint, the Cancelled its ``cp()`` raised, any exception that escaped
    ``run()`` and when it left.
    """

    def __init__(self, jobs: Jobs, job: int, item: Callable[[], object] = work) -> None:
        self.jobs = jobs
        self.job = job
        self.item = item
        self.entered = threading.Event()
        self.cp: Any = None
        self.items = 0
        self.raised: Cancelled | None = None
        self.escaped: BaseException | None = None
        self.left_at: float | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            with self.jobs.run(self.job) as cp:
                self.cp = cp
                self.entered.set()
                while True:
                    try:
                        cp()
                    except Cancelled as exc:
                        self.raised = exc
                        raise
                    self.item()
                    self.items += 1
        except BaseException as exc:
            self.escaped = exc
        finally:
            self.left_at = time.monotonic()
            self.entered.set()

    def start(self) -> LoopWorker:
        self.thread.start()
        assert self.entered.wait(10), "the worker did not enter run()"
        assert self.escaped is None, self.escaped
        return self

    def join(self, timeout: float) -> bool:
        """True when the worker has left within ``timeout`` seconds."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def workers(db: Any) -> Iterator[Callable[..., LoopWorker]]:
    """Start LoopWorkers; any still running at teardown is cancelled and joined."""
    started: list[LoopWorker] = []

    def start(jobs: Jobs, job: int, item: Callable[[], object] = work) -> LoopWorker:
        w = LoopWorker(jobs, job, item).start()
        started.append(w)
        return w

    yield start
    for w in started:
        if w.thread.is_alive():
            with db.engine.begin() as conn:  # deleting the row stops it at the next poll
                conn.execute(delete(TABLE).where(TABLE.c.id == w.job))
            w.join(10)


CHILD = """
import sys
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis

url, job, mode, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
engine = create_engine(url)
jobs = Jobs(engine, Analysis, interval=interval)
if mode == "run":
    items = 0
    with jobs.run(job) as cp:
        print("started", flush=True)
        while True:
            cp()
            sum(i * i for i in range(300))
            items += 1
    print("stopped", jobs.status(job).value, int(cp.cancelled), items, flush=True)
elif mode == "cancel":
    print("cancel", jobs.cancel(job, reason=sys.argv[5]), flush=True)
engine.dispose()
"""


class Child:
    """A Python subprocess running CHILD, with its own engine and Jobs."""

    def __init__(self, errors: Path, *args: object) -> None:
        self._errors_path = errors
        self._errors = errors.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = start_thread(self._read)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr(self) -> str:
        self._errors.flush()
        return self._errors_path.read_text()

    def expect(self, word: str, timeout: float) -> list[str]:
        """The next line of the child's output, which must start with ``word``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the child printed nothing in {timeout}s; stderr:\n{self.stderr()}")
        if line is None or line.split()[:1] != [word]:
            self.proc.wait(10)
            pytest.fail(f"expected {word!r} from the child, got {line!r}:\n{self.stderr()}")
        return line.split()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._errors.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(*args: object) -> Child:
        child = Child(tmp_path / f"child-{len(children)}.err", *args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


# -- cancel from another thread and another process ----------------------------------------


def test_cancel_from_another_thread(db, workers):
    jobs = db.jobs()
    job = db.add()
    w = workers(jobs, job)
    assert jobs.status(job) is Status.IN_PROGRESS
    assert jobs.cancel(job, reason="user deleted the session") is True
    cancelled_at = time.monotonic()
    assert w.join(INTERVAL + MARGIN), "the worker did not stop"
    assert w.left_at - cancelled_at < INTERVAL + MARGIN
    assert w.escaped is None  # run() swallowed the Cancelled of its own job
    assert w.raised is not None
    assert (w.raised.job_id, w.raised.reason) == (job, "user deleted the session")
    assert w.cp.cancelled is True
    assert w.items > 0
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None
    assert row["cancel_reason"] == "user deleted the session"
    assert jobs.wait(job, timeout=5) is Status.CANCELLED


def test_cancel_reaches_a_worker_in_another_process(db, spawn):
    jobs = db.jobs()
    job = db.add()
    child = spawn(db.url, job, "run", INTERVAL)
    child.expect("started", timeout=60)
    assert jobs.status(job) is Status.IN_PROGRESS
    assert jobs.cancel(job, reason="from the parent") is True
    cancelled_at = time.monotonic()
    # The child sees the cancel only by polling its row: no shared memory with us.
    _, status, cancelled, items = child.expect("stopped", timeout=INTERVAL + MARGIN)
    stopped_after = time.monotonic() - cancelled_at
    assert stopped_after < INTERVAL + MARGIN
    assert (status, cancelled) == ("cancelled", "1")
    assert int(items) > 0
    assert child.proc.wait(MARGIN) == 0, child.stderr()
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["cancel_reason"] == "from the parent"
    assert row["finished_at"] is not None
    assert row["finished_at"] >= row["cancel_requested_at"]
    assert jobs.wait(job, timeout=5) is Status.CANCELLED


@pytest.mark.parametrize("watch", [False, None], ids=["threadless", "default"])
def test_cancel_from_another_process_reaches_a_worker_here(db, workers, spawn, watch):
    jobs = db.jobs(watch=watch)
    job = db.add()
    w = workers(jobs, job)
    seen: dict[str, Any] = {}
    w.cp.on_cancel(lambda: seen.setdefault("callback thread", threading.current_thread()))
    child = spawn(db.url, job, "cancel", INTERVAL, "from the child")
    assert child.expect("cancel", timeout=60) == ["cancel", "True"]
    committed_at = time.monotonic()  # the child prints after the commit
    assert w.join(INTERVAL + MARGIN), "the worker did not see the cancel"
    assert w.left_at - committed_at < INTERVAL + MARGIN
    assert w.escaped is None
    assert w.raised is not None
    assert w.raised.reason == "from the child"
    assert w.cp.reason == "from the child"
    if watch is False:
        # Observed by the worker's own poll, so its callbacks ran in the worker's thread.
        assert seen["callback thread"] is w.thread
    else:
        # Observed by the watcher (its poll or, on PostgreSQL, the notification).
        assert seen["callback thread"].name.startswith("dbcancel-runtime")
    assert child.proc.wait(MARGIN) == 0, child.stderr()
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None


# -- cancel_where --------------------------------------------------------------------------


def test_cancel_where_cancels_only_matching_unfinished_jobs(db):
    # Threadless: no poll can explain what the checkpoint sees, and no watcher can take
    # the cancel's notification before cancel_where() does.
    jobs = db.jobs(interval=3600, watch=False)
    pending = db.add(user_id="alice", session_id="s1")
    running = db.add(user_id="alice", session_id="s1")
    other_session = db.add(user_id="alice", session_id="s2")
    other_user = db.add(user_id="bob", session_id="s1")
    completed = db.add(user_id="alice", session_id="s1")
    with jobs.run(completed):
        pass
    cancelled = db.add(user_id="alice", session_id="s1")
    jobs.cancel(cancelled, reason="earlier")
    untouched = [other_session, other_user, completed, cancelled]
    before = {job: read_row(db, job) for job in untouched}
    calls = []
    with jobs.run(running) as cp:
        cp.on_cancel(lambda: calls.append(threading.current_thread()))
        assert jobs.cancel_where(user_id="alice", session_id="s1") == 2
        assert cp.cancelled is True  # at once, without a poll
        assert calls == [threading.current_thread()]
        assert read_row(db, running)["finished_at"] is None  # its worker is still here
    for job in (pending, running):
        row = read_row(db, job)
        assert row["status"] is Status.CANCELLED
        assert row["cancel_requested_at"] is not None
        assert row["finished_at"] is not None
    assert {job: read_row(db, job) for job in untouched} == before
    assert jobs.cancel_where(user_id="alice", session_id="s1") == 0
    assert jobs.cancel_where(user_id="nobody") == 0
    assert jobs.cancel_where(user_id="bob") == 1
    assert read_row(db, other_user)["status"] is Status.CANCELLED


# -- on_cancel callbacks -------------------------------------------------------------------


def test_callbacks_run_once(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    calls: list[str] = []
    with jobs.run(job) as cp:
        cp.on_cancel(lambda: calls.append("a"))
        cp.on_cancel(lambda: calls.append("b"))
        assert calls == []
        assert jobs.cancel(job) is True
        assert calls == ["a", "b"]
        assert jobs.cancel(job) is True
        assert cp.poll() is Status.CANCELLED
        with pytest.raises(Cancelled):
            cp()
        assert calls == ["a", "b"]
    assert calls == ["a", "b"]


def test_a_local_cancel_waits_for_callbacks_the_watcher_runs(db):
    """Watched: whichever thread observes the cancel first (the cancelling one, or the
    watcher with the cancel's notification on PostgreSQL) runs the callbacks, and
    cancel() returns only once they have run."""
    jobs = db.jobs(interval=3600, watch=True)
    job = db.add()
    ran = threading.Event()

    def slow() -> None:
        time.sleep(0.05)  # the work of a callback, not a synchronisation
        ran.set()

    with jobs.run(job) as cp:
        cp.on_cancel(slow)
        assert jobs.cancel(job) is True
        assert ran.is_set()


def test_callback_registered_after_cancel_runs_at_once(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    calls: list[threading.Thread] = []
    with jobs.run(job) as cp:
        jobs.cancel(job)
        cp.on_cancel(lambda: calls.append(threading.current_thread()))
        assert calls == [threading.current_thread()]
    assert len(calls) == 1


def test_a_job_cancelled_before_it_started_never_runs_its_body(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    jobs.cancel(job, reason="early")
    with pytest.raises(Cancelled) as info, jobs.run(job):
        raise AssertionError("the body of a cancelled job ran")
    assert (info.value.job_id, info.value.reason) == (job, "early")
    assert jobs.active() == ()


def test_failing_callback_is_logged_and_the_others_run(db, caplog):
    jobs = db.jobs(interval=3600)
    job = db.add()
    calls: list[str] = []
    boom = OSError("socket already closed")

    def bad() -> None:
        calls.append("bad")
        raise boom

    with jobs.run(job) as cp:
        cp.on_cancel(lambda: calls.append("first"))
        cp.on_cancel(bad)
        cp.on_cancel(lambda: calls.append("last"))
        with caplog.at_level(logging.ERROR, logger="dbcancel"):
            assert jobs.cancel(job) is True  # the callback's error does not reach cancel()
        assert calls == ["first", "bad", "last"]
    records = [r for r in caplog.records if r.name == "dbcancel"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is boom
    assert "on_cancel callback" in records[0].getMessage()
    assert repr(job) in records[0].getMessage()
    assert read_row(db, job)["status"] is Status.CANCELLED


def test_removed_callbacks_do_not_run(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    calls: list[str] = []
    with jobs.run(job) as cp:
        handle = cp.on_cancel(lambda: calls.append("removed"))
        handle.remove()
        handle.remove()  # harmless twice
        with cp.on_cancel(lambda: calls.append("scoped")) as scoped:
            assert isinstance(scoped, dbcancel.CallbackHandle)
        kept = cp.on_cancel(lambda: calls.append("kept"))
        jobs.cancel(job)
        kept.remove()  # harmless after it ran
    assert calls == ["kept"]


def test_callback_inside_its_with_block_runs(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    calls: list[str] = []
    with jobs.run(job) as cp, cp.on_cancel(lambda: calls.append("scoped")):
        jobs.cancel(job)
        assert calls == ["scoped"]


def test_local_cancel_closes_the_socket_a_worker_is_blocked_on(db):
    """The callback runs in the cancelling thread before cancel() returns; it shuts the
    socket down, which wakes the worker blocked in recv(). Threadless: a watcher may take
    the cancel's notification first, and run the callback in its own thread (see
    test_a_local_cancel_waits_for_callbacks_the_watcher_runs)."""
    jobs = db.jobs(interval=3600, watch=False)  # only the callback can wake the worker in time
    job = db.add()
    ours, theirs = socket.socketpair()
    ready = threading.Event()
    cancel_returned = threading.Event()
    seen: dict[str, Any] = {}

    def close_socket() -> None:
        seen["callback thread"] = threading.current_thread()
        seen["cancel had returned"] = cancel_returned.is_set()
        ours.shutdown(socket.SHUT_RDWR)

    def worker() -> None:
        try:
            with jobs.run(job) as cp:
                cp.on_cancel(close_socket)
                ready.set()
                seen["received"] = ours.recv(1024)  # the peer never sends
                cp()
                seen["went on"] = True
        except BaseException as exc:
            seen["escaped"] = exc

    try:
        thread = start_thread(worker)
        assert ready.wait(10)
        assert jobs.cancel(job, reason="session deleted") is True
        cancel_returned.set()
        assert seen["callback thread"] is threading.current_thread()
        assert seen["cancel had returned"] is False
        thread.join(MARGIN)
        assert not thread.is_alive(), "the worker is still blocked in recv()"
    finally:
        ours.close()
        theirs.close()
    assert seen["received"] == b""
    assert "went on" not in seen
    assert "escaped" not in seen
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None


# -- dbcancel.checkpoint() and dbcancel.current() ------------------------------------------


def isolated(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test`` in a context of its own.

    pytest runs every test in the main thread's one context: a run entered and never left
    (or left out of order) by an earlier test would still be "current" here. The test's
    own entering and leaving happen inside the fresh context, so a library that leaks
    its checkpoint is still caught.
    """

    @functools.wraps(test)
    def run_isolated(*args: Any, **kwargs: Any) -> None:
        contextvars.Context().run(test, *args, **kwargs)

    return run_isolated


@isolated
def test_checkpoint_outside_any_job_is_a_no_op():
    assert dbcancel.current() is None
    assert dbcancel.checkpoint() is None
    seen = []
    thread = start_thread(lambda: seen.append((dbcancel.current(), dbcancel.checkpoint())))
    thread.join(10)
    assert seen == [(None, None)]


def deep_code() -> Any:
    """Code several calls below the worker loop, which was passed no checkpoint."""

    def deeper() -> Any:
        dbcancel.checkpoint()
        return dbcancel.current()

    return deeper()


@isolated
def test_checkpoint_inside_a_job(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    with jobs.run(job) as cp:
        assert dbcancel.current() is cp
        assert deep_code() is cp
        jobs.cancel(job, reason="stop")
        with pytest.raises(Cancelled) as info:
            deep_code()
        assert (info.value.job_id, info.value.reason) == (job, "stop")
    assert dbcancel.current() is None
    assert deep_code() is None
    assert read_row(db, job)["status"] is Status.CANCELLED


@isolated
def test_checkpoint_polls_the_row(db):
    """A cancel this process never heard of reaches deep code through the poll."""
    jobs = db.jobs()
    job = db.add()
    with jobs.run(job):
        with db.engine.begin() as conn:
            conn.execute(
                update(TABLE)
                .where(TABLE.c.id == job)
                .values(status=Status.CANCELLED, cancel_reason="elsewhere")
            )
        with pytest.raises(Cancelled) as info:
            loop_until(time.monotonic() + INTERVAL + MARGIN)
        assert info.value.reason == "elsewhere"
    assert read_row(db, job)["finished_at"] is not None


def loop_until(deadline: float) -> None:
    """A worker loop whose only checkpoint is deep down in the code it calls."""
    while time.monotonic() < deadline:
        deep_code()
        work()


@isolated
def test_current_of_nested_jobs(db):
    jobs = db.jobs(interval=3600)
    outer_job, inner_job = db.add(), db.add()
    reached: list[str] = []
    with jobs.run(outer_job) as outer:
        with jobs.run(inner_job) as inner:
            assert dbcancel.current() is inner
            jobs.cancel(inner_job)
            deep_code()  # checks the inner job: raises, and run() swallows it
            reached.append("inner went on")
        assert dbcancel.current() is outer
        assert deep_code() is outer  # the outer job is not cancelled
    assert reached == []
    assert dbcancel.current() is None
    assert read_row(db, outer_job)["status"] is Status.COMPLETED
    assert read_row(db, inner_job)["status"] is Status.CANCELLED


@isolated
def test_current_belongs_to_the_thread_running_the_job(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def worker() -> None:
        with jobs.run(job) as cp:
            seen["is current"] = dbcancel.current() is cp
            inside.set()
            release.wait(30)

    thread = start_thread(worker)
    try:
        assert inside.wait(10)
        assert seen["is current"] is True
        assert dbcancel.current() is None
        dbcancel.checkpoint()
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive()


# -- jobs.active() -------------------------------------------------------------------------


def test_active_lists_the_running_jobs(db, workers):
    jobs = db.jobs()
    first, second = db.add(), db.add()
    assert jobs.active() == ()
    t0 = dt.datetime.now(dt.UTC)
    w1 = workers(jobs, first, lambda: time.sleep(0.001))
    w2 = workers(jobs, second, lambda: time.sleep(0.001))
    t1 = dt.datetime.now(dt.UTC)
    active = {entry.job_id: entry for entry in jobs.active()}
    assert set(active) == {first, second}
    for entry, w in ((active[first], w1), (active[second], w2)):
        assert entry.thread is w.thread
        assert entry.checkpoint is w.cp
        assert entry.started_at.tzinfo is not None
        assert t0 <= entry.started_at <= t1
    assert db.jobs().active() == jobs.active()  # same table and database: same jobs
    jobs.cancel(first)
    assert w1.join(MARGIN)
    assert [entry.job_id for entry in jobs.active()] == [second]
    jobs.cancel(second)
    assert w2.join(MARGIN)
    assert jobs.active() == ()


def test_active_is_empty_after_every_kind_of_exit(db):
    jobs = db.jobs(interval=3600)
    jobs_ids = [db.add() for _ in range(4)]
    with jobs.run(jobs_ids[0]):
        assert len(jobs.active()) == 1
    with pytest.raises(LookupError), jobs.run(jobs_ids[1]):
        raise LookupError("failed")
    with jobs.run(jobs_ids[2]) as cp:
        jobs.cancel(jobs_ids[2])
        cp()
    with pytest.raises(dbcancel.InvalidTransition), jobs.run(jobs_ids[0]):
        pass
    assert jobs.active() == ()


# -- jobs.wait() ---------------------------------------------------------------------------


def test_wait(db):
    jobs = db.jobs()
    job = db.add()
    inside, release = threading.Event(), threading.Event()
    waited: dict[str, Any] = {}

    def worker() -> None:
        with jobs.run(job):
            inside.set()
            release.wait(30)

    def waiter() -> None:
        waited["status"] = jobs.wait(job, timeout=30)
        waited["released before return"] = release.is_set()

    with pytest.raises(TimeoutError) as info:
        jobs.wait(job, timeout=0.1)  # pending: not stopped either
    assert "'pending'" in str(info.value)

    work_thread = start_thread(worker)
    try:
        assert inside.wait(10)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            jobs.wait(job, timeout=0.2)
        elapsed = time.monotonic() - started
        assert 0.19 <= elapsed < MARGIN
        message = str(info.value)
        assert "Analysis" in message
        assert repr(job) in message
        assert "'in_progress'" in message
        wait_thread = start_thread(waiter)
    finally:
        release.set()
    work_thread.join(10)
    wait_thread.join(10)
    assert not work_thread.is_alive()
    assert not wait_thread.is_alive()
    assert waited == {"status": Status.COMPLETED, "released before return": True}
    assert jobs.wait(job, timeout=0) is Status.COMPLETED
    assert jobs.wait(job) is Status.COMPLETED


def test_wait_for_a_missing_job(db):
    jobs = db.jobs()
    with pytest.raises(JobNotFound, match="Analysis 424242 not found"):
        jobs.wait(424242, timeout=1)


def test_wait_for_a_job_cancelled_while_pending(db):
    jobs = db.jobs()
    job = db.add()
    jobs.cancel(job)
    assert jobs.wait(job, timeout=0) is Status.CANCELLED


# -- the row deleted, the worker cancelling itself -----------------------------------------


def test_deleting_the_row_stops_the_worker(db, workers):
    jobs = db.jobs()
    job = db.add()
    w = workers(jobs, job)
    with db.sessions.begin() as s:
        s.delete(s.get(Analysis, job))
    deleted_at = time.monotonic()
    assert w.join(INTERVAL + MARGIN), "the worker did not notice the deletion"
    assert w.left_at - deleted_at < INTERVAL + MARGIN
    assert w.escaped is None  # run() exited cleanly
    assert w.raised is not None
    assert (w.raised.job_id, w.raised.reason) == (job, "deleted")
    assert (w.cp.cancelled, w.cp.reason) == (True, "deleted")
    assert read_row(db, job) is None
    assert jobs.active() == ()
    with pytest.raises(JobNotFound):
        jobs.wait(job, timeout=1)


def test_worker_raising_cancelled_marks_the_job_cancelled(db):
    jobs = db.jobs(interval=3600)
    job, quiet = db.add(), db.add()
    with jobs.run(job) as cp:
        raise Cancelled(job, "input vanished")
    assert (cp.cancelled, cp.reason) == (True, "input vanished")
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["cancel_reason"] == "input vanished"
    assert row["cancel_requested_at"] is not None
    assert row["finished_at"] is not None
    with jobs.run(quiet):
        raise Cancelled(quiet)
    assert read_row(db, quiet)["status"] is Status.CANCELLED
    assert read_row(db, quiet)["cancel_reason"] is None


# -- atomic results ------------------------------------------------------------------------


def add_results(session: Any, job: int, n: int = 3) -> None:
    session.add_all(Result(analysis_id=job, value=f"r{i}") for i in range(n))
    session.flush()


def test_results_commit_with_the_completion(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    with jobs.run(job) as cp:
        with db.sessions.begin() as s:
            add_results(s, job)
            cp.complete(s)
            # Not committed yet: another connection sees neither the results nor the status.
            assert jobs.status(job) is Status.IN_PROGRESS
            assert results_of(db, job) == []
        assert jobs.status(job) is Status.COMPLETED
        assert results_of(db, job) == ["r0", "r1", "r2"]
        finished_at = read_row(db, job)["finished_at"]
        assert finished_at is not None
    row = read_row(db, job)
    assert row["status"] is Status.COMPLETED
    assert row["finished_at"] == finished_at
    assert cp.cancelled is False


def test_results_of_a_job_cancelled_here_roll_back(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    reached: list[str] = []
    with jobs.run(job) as cp:
        assert jobs.cancel(job, reason="user left") is True
        with db.sessions.begin() as s:
            add_results(s, job)
            cp.complete(s)
            reached.append("after complete")
        reached.append("after commit")
    assert reached == []
    assert results_of(db, job) == []
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None


def test_results_of_a_job_cancelled_elsewhere_roll_back(db, spawn):
    """The cancel comes from another process: only the UPDATE inside the worker's own
    transaction can notice it (no poll is due, no local flag was flipped). Threadless:
    a watcher would take the cancel's notification on PostgreSQL."""
    jobs = db.jobs(interval=3600, watch=False)
    job = db.add()
    reached: list[str] = []
    with jobs.run(job) as cp:
        child = spawn(db.url, job, "cancel", INTERVAL, "from the child")
        assert child.expect("cancel", timeout=60) == ["cancel", "True"]
        assert cp.cancelled is False
        with db.sessions.begin() as s:
            add_results(s, job)
            cp.complete(s)
            reached.append("after complete")
    assert reached == []
    assert (cp.cancelled, cp.reason) == (True, "from the child")
    assert results_of(db, job) == []
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None


# MariaDB refreshes its information_schema view of InnoDB transactions and lock waits at
# most every 0.1 s, and only when it was not read in the last 0.1 s: polled every 10 ms,
# it keeps showing what it showed when the polling began, and a lock wait that began
# after that never appears.
LOCK_VIEW_REFRESH = 0.2


def _waits_on(db: Any, holder: Any) -> bool:
    """True when another transaction waits for a lock held by ``holder``'s connection."""
    with db.engine.connect() as conn:
        if db.name == "postgresql":
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE :holder = ANY(pg_blocking_pids(pid))"
                    ),
                    {"holder": holder},
                ).scalar()
            )
        return bool(
            conn.execute(
                text(
                    "SELECT COUNT(*) FROM information_schema.INNODB_LOCK_WAITS w "
                    "JOIN information_schema.INNODB_TRX t ON t.trx_id = w.blocking_trx_id "
                    "WHERE t.trx_mysql_thread_id = :holder"
                ),
                {"holder": holder},
            ).scalar()
        )


def test_cancel_racing_an_open_completion(db):
    """The cancel arrives while the worker's completing transaction is still open.

    On PostgreSQL and MariaDB the cancel's UPDATE waits for the worker's row lock (the
    worker commits only once it sees that wait); on SQLite it waits for the write lock.
    Then it finds the job completed: cancel() returns False, the results stay. Whatever
    the timing, results exist if and only if the job is completed.
    """
    jobs = db.jobs(interval=3600)
    job = db.add()
    holding = threading.Event()
    cancelling = threading.Event()
    outcome: dict[str, Any] = {}

    def worker() -> None:
        holder = None
        try:
            with jobs.run(job) as cp, db.sessions.begin() as s:
                add_results(s, job)
                cp.complete(s)
                if db.name == "postgresql":
                    holder = s.execute(text("SELECT pg_backend_pid()")).scalar()
                elif db.name == "mariadb":
                    holder = s.execute(text("SELECT CONNECTION_ID()")).scalar()
                holding.set()
                assert cancelling.wait(10)
                if db.name == "sqlite":
                    # Nothing to observe: let the cancel reach the write lock.
                    time.sleep(0.2)
                    outcome["blocked"] = True
                else:
                    deadline = time.monotonic() + 10
                    while not _waits_on(db, holder) and time.monotonic() < deadline:
                        time.sleep(LOCK_VIEW_REFRESH)
                    outcome["blocked"] = _waits_on(db, holder)
                outcome["committing"] = time.monotonic()
        except BaseException as exc:
            outcome["escaped"] = exc

    def canceller() -> None:
        cancelling.set()
        outcome["cancel"] = jobs.cancel(job, reason="too late")
        outcome["cancel returned"] = time.monotonic()

    work_thread = start_thread(worker)
    assert holding.wait(10)
    cancel_thread = start_thread(canceller)
    work_thread.join(30)
    cancel_thread.join(30)
    assert not work_thread.is_alive()
    assert not cancel_thread.is_alive()
    assert "escaped" not in outcome, outcome["escaped"]
    status = read_row(db, job)["status"]
    results = results_of(db, job)
    assert (status is Status.COMPLETED) == (results == ["r0", "r1", "r2"])
    assert (status is Status.CANCELLED) == (results == [])
    # The cancel really waited for the open transaction, and then lost.
    assert outcome["blocked"] is True
    assert outcome["cancel returned"] > outcome["committing"]
    assert outcome["cancel"] is False
    assert status is Status.COMPLETED
    assert read_row(db, job)["cancel_requested_at"] is None


class SlowToLeave:
    """A backend that takes its time to release a worker thread's hold on the database,
    which a worker does after writing its end and before it has left ``run()``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def release(self) -> None:
        time.sleep(0.05)
        self._inner.release()


def test_wait_returns_only_once_the_local_worker_has_left_run(db):
    """The worker writes its end (finished_at) and then leaves run(): the registry, the
    watcher. wait() must return after both, or cancel-then-delete would start while
    the worker is still inside run()."""
    jobs = Jobs.from_backend(SlowToLeave(db.jobs()._backend), interval=INTERVAL)
    for _ in range(5):
        job = db.add()
        entered = threading.Event()

        def work(job: int = job, entered: threading.Event = entered) -> None:
            with jobs.run(job) as cp:
                entered.set()
                for _ in range(30_000):  # bounded: ends by itself if the cancel is lost
                    cp()
                    time.sleep(0.001)

        thread = start_thread(work)
        assert entered.wait(30)
        assert jobs.cancel(job) is True
        assert jobs.wait(job, timeout=30) is Status.CANCELLED
        assert jobs.active() == ()
        thread.join(30)
        assert not thread.is_alive()

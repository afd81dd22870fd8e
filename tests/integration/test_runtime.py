"""The runtime under what real deployments do to it: raising callbacks, a dead thread,
interrupted starts and ends, open transactions, frozen networks, thread pools, forks,
many databases, remote waits and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import dbcancel
from dbcancel import Cancelled, DbcancelError, Jobs, Status
from dbcancel._runtime import runtime
from dbcancel._timeouts import POLL_TIMEOUT
from dbcancel.models import worker_table
from tests.models import Analysis, Base, Result

from .proxy import freezing_proxy

ROOT = Path(__file__).resolve().parents[2]
TABLE = Analysis.__table__
WORKERS = worker_table(Base.metadata)
INTERVAL = 0.1


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def cancel_behind_our_back(db: Any, job: int, reason: str = "elsewhere") -> None:
    """What a cancel in another process does to the row, without telling this process."""
    with db.engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id == job, TABLE.c.status.in_(["pending", "in_progress"]))
            .values(status="cancelled", cancel_reason=reason)
        )


def run_in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def row(db: Any, job: int) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(TABLE).where(TABLE.c.id == job)).one()


# -- supervision: callbacks and the thread ------------------------------------------------


class Boom(BaseException):
    """What a KeyboardInterrupt-like exception looks like to the runtime."""


def _exit() -> None:
    sys.exit(3)


def _boom() -> None:
    raise Boom


@pytest.mark.parametrize("kind", ["SystemExit", "BaseException", "Cancelled"])
def test_a_raising_callback_never_stops_the_next_cancel(db, kind, caplog):
    """A callback that raises anything, in the runtime's thread, is logged with its job
    and goes no further: the next job of the table is still cancelled at once."""
    jobs = db.jobs(interval=INTERVAL, watch=True)
    first, second = db.add(), db.add()
    with jobs.run(first) as cp:
        if kind == "Cancelled":
            cp.on_cancel(cp)  # calling the cancelled checkpoint raises Cancelled
        else:
            cp.on_cancel(_exit if kind == "SystemExit" else _boom)
        after = threading.Event()
        cp.on_cancel(after.set)  # the callbacks after the raising one still run
        cancel_behind_our_back(db, first)  # observed by the runtime thread's poll
        assert after.wait(10)
    assert any(
        "on_cancel callback" in r.getMessage() and repr(first) in r.getMessage()
        for r in caplog.records
    )
    with jobs.run(second) as cp:
        seen = threading.Event()
        cp.on_cancel(seen.set)
        cancel_behind_our_back(db, second)
        assert seen.wait(INTERVAL * 1.1 + 10), "the runtime stopped serving the table"
    assert runtime().stats().running
    assert jobs.status(second) is Status.CANCELLED


def test_a_dead_runtime_thread_is_started_again_by_the_next_job(db):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    rt = runtime()
    with jobs.run(db.add()):
        pass
    assert rt.stats().running
    before = rt.restarts
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    with rt._cond:
        rt._thread = dead  # what a thread that died anyway leaves behind
    job = db.add()
    with jobs.run(job) as cp:
        assert rt.restarts == before + 1
        assert jobs.stats().restarts == before + 1
        seen = threading.Event()
        cp.on_cancel(seen.set)
        cancel_behind_our_back(db, job)
        assert seen.wait(INTERVAL * 1.1 + 10)


def test_a_job_with_max_staleness_restarts_a_dead_runtime_from_its_checkpoint(db):
    jobs = db.jobs(interval=INTERVAL, watch=True, max_staleness=30)
    job = db.add()
    rt = runtime()
    with jobs.run(job) as cp:
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        with rt._cond:
            rt._thread = dead
        cp._due = 0.0  # as if its staleness deadline were near: the checkpoint looks closer
        cp()
        assert rt.stats().running
        seen = threading.Event()
        cp.on_cancel(seen.set)
        cancel_behind_our_back(db, job)
        assert seen.wait(INTERVAL * 1.1 + 10)


# -- no orphans at the edges --------------------------------------------------------------


def _lock_row(db: Any, job: int) -> tuple[Any, Any]:
    """Hold `job`'s row lock in another transaction; returns (connection, transaction)."""
    conn = db.engine.connect()
    transaction = conn.begin()
    conn.execute(select(TABLE.c.id).where(TABLE.c.id == job).with_for_update())
    return conn, transaction


servers_only = pytest.mark.parametrize(
    "database",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)


@servers_only
def test_a_timeout_around_a_start_that_waits_on_a_row_lock_leaves_no_orphan(db):
    """The task is cancelled while `__aenter__` waits for the start; the start then
    commits in its thread. The job must end settled, not in progress with no one
    running it, and this process must not beat for it."""
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    conn, transaction = _lock_row(db, job)

    def release() -> None:
        transaction.rollback()
        conn.close()

    async def start() -> None:
        try:
            async with asyncio.timeout(0.3), jobs.run(job) as cp:
                cp()
                pytest.fail("the body must not run")
        finally:
            # The start goes on in its thread, waiting for the lock; asyncio.run() waits
            # for that thread before it returns, so the lock goes now.
            await asyncio.to_thread(release)

    with pytest.raises(TimeoutError):
        asyncio.run(start())
    assert jobs.wait(job, timeout=30) is Status.FAILED
    assert "interrupted while starting" in row(db, job).error
    assert jobs.active() == ()
    served = runtime().database_of(jobs._backend)
    assert served is None or not served.periods  # not beating for it


def test_an_interrupt_between_the_start_and_the_body_settles_the_job(db, monkeypatch):
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()

    def interrupted(self: Any, cp: Any, started: bool) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("dbcancel._worker.JobRun._enter", interrupted)
    with pytest.raises(KeyboardInterrupt), jobs.run(job):
        pytest.fail("the body must not run")
    assert jobs.status(job) is Status.FAILED
    assert row(db, job).finished_at is not None
    assert jobs.active() == ()


def test_an_interrupt_during_the_start_write_settles_the_job(db, monkeypatch):
    """Ctrl-C arrives while the start's UPDATE runs: it may have committed. The row is
    settled (failed) if it names this process, never left in progress."""
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    backend = jobs._backend
    apply = backend.apply

    def committed_then_interrupted(change: Any, **kwargs: Any) -> int:
        count = apply(change, **kwargs)
        if change.to is Status.IN_PROGRESS:
            raise KeyboardInterrupt
        return count

    monkeypatch.setattr(backend, "apply", committed_then_interrupted)
    with pytest.raises(KeyboardInterrupt), jobs.run(job):
        pytest.fail("the body must not run")
    monkeypatch.undo()
    assert jobs.status(job) is Status.FAILED
    assert jobs.wait(job, timeout=5) is Status.FAILED


def test_a_task_cancelled_while_its_end_is_written_still_writes_it(db):
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()

    async def main() -> None:
        body_ran = asyncio.Event()

        async def work() -> None:
            async with jobs.run(job):
                body_ran.set()  # no await after it: the task goes on into __aexit__

        task = asyncio.create_task(work())
        await body_ran.wait()  # wakes once the task is suspended in __aexit__ (or done)
        task.cancel()  # lands in __aexit__'s await
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert jobs.wait(job, timeout=10) in (Status.COMPLETED, Status.FAILED)
    assert jobs.active() == ()


def test_complete_with_the_commit_after_the_block_does_not_hang(db):
    """`cp.complete(session)` inside the run, the commit after it: the exit must not
    write on a second connection (it would wait for the caller's row lock forever)."""
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    done = threading.Event()

    def work() -> None:
        # The run is the innermost: it exits first, the caller's transaction commits after.
        with Session(db.engine) as session, session.begin(), jobs.run(job) as cp:
            session.add(Result(analysis_id=job, value="42"))
            cp.complete(session)
        done.set()

    thread = run_in_thread(work)
    assert done.wait(30), "the run's exit waited for the caller's own row lock"
    thread.join(5)
    assert jobs.wait(job, timeout=5) is Status.COMPLETED
    assert row(db, job).finished_at is not None


def test_complete_rolled_back_after_the_block_fails_the_job(db):
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()

    class Rollback(Exception):
        pass

    def work() -> None:
        with Session(db.engine) as session, session.begin():
            with jobs.run(job) as cp:
                session.add(Result(analysis_id=job, value="42"))
                cp.complete(session)
            raise Rollback  # the caller's transaction rolls back after the run ended

    with pytest.raises(Rollback):
        work()
    assert jobs.wait(job, timeout=30) is Status.FAILED
    assert "rolled back" in row(db, job).error


# -- hangs fail closed --------------------------------------------------------------------


def _through_proxy(db: Any, port: int) -> Any:
    url = make_url(db.url).set(host="127.0.0.1", port=port)
    if db.name == "postgresql":
        url = url.update_query_dict({"connect_timeout": "2"})
        return create_engine(url, pool_pre_ping=False)
    return create_engine(url, connect_args={"connect_timeout": 2}, pool_pre_ping=False)


@servers_only
@pytest.mark.slow
@pytest.mark.parametrize("watch", [True, False], ids=["watched", "threadless"])
def test_max_staleness_stops_a_job_when_the_network_freezes(db, watch):
    """A proxy that stops forwarding: no error ever comes back, the server never sees
    the query. The job still stops within max_staleness plus an interval (bound
    generous), and its worker is not blocked in a poll for longer."""
    port = make_url(db.url).port or (5432 if db.name == "postgresql" else 3306)
    with freezing_proxy(port) as proxy:
        engine = _through_proxy(db, proxy.port)
        try:
            jobs = Jobs(engine, Analysis, interval=INTERVAL, watch=watch, max_staleness=2)
            job = db.add()
            stopped: dict[str, float] = {}

            def work() -> None:
                with jobs.run(job) as cp:
                    cp.on_cancel(lambda: stopped.setdefault("callback", time.monotonic()))
                    try:
                        while True:
                            cp()
                            time.sleep(0.01)
                    finally:
                        stopped["worker"] = time.monotonic()

            thread = run_in_thread(work)
            wait_until(lambda: jobs.active(), 10, "the job to start")
            time.sleep(3 * INTERVAL)  # a few polls that work, before the freeze
            proxy.freeze()
            frozen = time.monotonic()
            # The checkpoint raises within max_staleness plus an interval (bound
            # generous); the run's end, which cannot reach the database, is given up
            # after a poll's time limit, and logged.
            thread.join(2 + INTERVAL + POLL_TIMEOUT + 15)
            assert not thread.is_alive(), "the job ran on behind a frozen network"
            assert stopped["worker"] - frozen < 2 + INTERVAL + 8
            assert "callback" in stopped
            proxy.thaw()
        finally:
            engine.dispose()
    # The exit's write failed while the network was frozen (it is logged): the row shows
    # in_progress until a reap finds the worker gone, or says it stopped.
    assert db.jobs().status(job) in (Status.IN_PROGRESS, Status.CANCELLED)


# -- checkpoints follow the work ------------------------------------------------------------


def test_bound_checkpoints_stop_the_threads_of_a_pool(db):
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    started = threading.Barrier(5)
    outcomes: list[str] = []

    def item(n: int) -> None:
        started.wait(10)
        try:
            for _ in range(10_000):
                dbcancel.checkpoint()
                time.sleep(0.001)
            outcomes.append("ran to its end")
        except Cancelled:
            outcomes.append("cancelled")
            raise

    with jobs.run(job), ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(dbcancel.bind_checkpoint(item), n) for n in range(4)]
        started.wait(10)
        jobs.cancel(job, reason="stop the pool")
        for future in futures:
            with pytest.raises(Cancelled):
                future.result(30)
    assert outcomes == ["cancelled"] * 4
    assert jobs.status(job) is Status.CANCELLED


def test_outside_a_job_bind_checkpoint_changes_nothing():
    def fn(x: int) -> int:
        return x + 1

    assert dbcancel.bind_checkpoint(fn) is fn


def test_a_forked_child_that_calls_the_parents_checkpoint_gets_an_error(db):
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    with jobs.run(job) as cp:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe only
            verdict = b"no error"
            try:
                try:
                    dbcancel.checkpoint()
                except DbcancelError as err:
                    verdict = b"error: " + str(err).encode()[:200]
                try:
                    cp()
                except DbcancelError:
                    verdict += b" / cp too"
            finally:
                os.write(write, verdict)
                os._exit(0)
        os.close(write)
        verdict = os.read(read, 1000).decode()
        os.close(read)
        os.waitpid(pid, 0)
        cp()  # the parent's own is untouched
    assert verdict.startswith("error: the checkpoint of job"), verdict
    assert "forked" in verdict
    assert verdict.endswith("/ cp too")


# -- bounded resources ----------------------------------------------------------------------


def _dbcancel_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dbcancel-")]


@pytest.mark.sqlite
def test_thirty_databases_leave_one_thread_and_no_engine_behind(tmp_path, monkeypatch):
    monkeypatch.setattr("dbcancel._runtime.IDLE_GRACE", 0.2)
    before = {t for t in _dbcancel_threads() if t.name != "dbcancel-runtime"}
    rt = runtime()
    for n in range(30):
        engine = create_engine(f"sqlite:///{tmp_path / f'tenant{n}.db'}")
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            job = conn.execute(TABLE.insert().values(user_id="a")).inserted_primary_key[0]
        jobs = Jobs(engine, Analysis, interval=INTERVAL)  # watched: the runtime serves it
        with jobs.run(job) as cp:
            cp()
        assert jobs.wait(job, timeout=10) is Status.COMPLETED
        engine.dispose()
    wait_until(lambda: rt.stats().databases == 0, 10, "the idle databases to be forgotten")
    threads = [t for t in _dbcancel_threads() if t not in before]
    assert [t.name for t in threads] == ["dbcancel-runtime"]


def test_threadless_means_no_thread_and_the_checkpoints_beat(db, tmp_path):
    """`watch=False` in a process of its own: no dbcancel thread at any point, and the
    worker row still beats (its checkpoints write the beats when due)."""
    job = db.add()
    script = f"""
import threading, time
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis
engine = create_engine({db.url!r})
jobs = Jobs(engine, Analysis, interval=0.05, watch=False, heartbeat=0.2)
with jobs.run({job}) as cp:
    ends = time.monotonic() + 1.5
    while time.monotonic() < ends:
        cp()
        names = [t.name for t in threading.enumerate() if t.name.startswith("dbcancel")]
        assert not names, names
        time.sleep(0.01)
    print("beats", jobs.stats().heartbeats, flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    beats = int(proc.stdout.split()[-1])
    assert beats >= 3  # the first as it started, then every 0.2 s from the checkpoints
    assert db.jobs().status(job) is Status.COMPLETED


# -- wait() returns promptly ----------------------------------------------------------------


@pytest.mark.parametrize(
    "database", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)
def test_a_remote_wait_returns_soon_after_the_end_even_at_a_long_interval(db):
    """A worker in another process at interval 30 s winds down for a while after the
    cancel; wait() here returns within a second of its end (the end's notification),
    not up to an interval later."""
    job = db.add()
    script = f"""
import sys, time
from sqlalchemy import create_engine
from dbcancel import Cancelled, Jobs
from tests.models import Analysis
jobs = Jobs(create_engine({db.url!r}), Analysis, interval=30)
with jobs.run({job}) as cp:
    print("started", flush=True)
    while not cp.cancelled:
        time.sleep(0.005)
    time.sleep(2.0)  # winding down
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        jobs = db.jobs(interval=30)
        assert jobs.cancel(job, reason="deleted")
        assert jobs.wait(job, timeout=60) is Status.CANCELLED
        returned = time.time()
        finished = row(db, job).finished_at.timestamp()
        assert returned - finished < 1.5, returned - finished
    finally:
        child.wait(60)
        if child.stdout is not None:
            child.stdout.close()


# -- shutdown -------------------------------------------------------------------------------


def test_shutdown_cancels_the_running_jobs_and_stops_the_runtime(db):
    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    entered = threading.Event()

    def work() -> None:
        with jobs.run(job) as cp:
            entered.set()
            while True:
                cp()
                time.sleep(0.005)

    thread = run_in_thread(work)
    assert entered.wait(10)
    dbcancel.shutdown(timeout=10)
    thread.join(10)
    assert not thread.is_alive()
    assert jobs.status(job) is Status.CANCELLED
    assert row(db, job).cancel_reason == dbcancel.SHUTDOWN_REASON
    assert not runtime().stats().running
    dbcancel.shutdown(timeout=1)  # twice: harmless
    with jobs.run(db.add()) as cp:  # a later job starts it again
        cp()
    assert runtime().stats().running


def test_jobs_left_running_in_daemon_threads_end_cancelled_at_exit(db):
    job = db.add()
    script = f"""
import threading, time
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis
jobs = Jobs(create_engine({db.url!r}), Analysis, interval=0.05)
started = threading.Event()

def work():
    with jobs.run({job}):
        started.set()
        while True:
            time.sleep(0.01)   # never calls its checkpoint: only the exit hook ends it

threading.Thread(target=work, daemon=True).start()
started.wait(30)
print("exiting", flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    ended = row(db, job)
    assert (ended.status, ended.cancel_reason) == ("cancelled", "shutdown")
    assert ended.finished_at is not None


@pytest.mark.parametrize(
    "database",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)
def test_a_round_trip_limit_is_off_the_connection_before_the_pool_has_it_back(db):
    """The runtime's polls give their connection back to the pool inside their time
    limit; the limit must come off first, or the next thread to check the connection out
    runs under it (a PyMySQL read then met a socket switched under its feet)."""
    from sqlalchemy import event

    from dbcancel import _timeouts

    jobs = db.jobs(interval=INTERVAL)
    job = db.add()
    seen: list[object] = []

    def limit_of(dbapi_connection: Any) -> object:
        if hasattr(dbapi_connection, "pgconn"):
            return vars(dbapi_connection).get("wait")  # the deadline's wrapper, if on
        return dbapi_connection._sock.gettimeout()  # PyMySQL: the app's own is None

    def at_checkin(dbapi_connection: Any, record: Any) -> None:
        seen.append(limit_of(dbapi_connection))

    event.listen(db.engine, "checkin", at_checkin)
    try:
        with _timeouts.limit(30.0):
            assert jobs._backend.read_many([job])  # a poll: a read on a pooled connection
            jobs._backend.mark_stopped(job)  # a write, in a transaction of its own
    finally:
        event.remove(db.engine, "checkin", at_checkin)
    assert seen, "no connection went back to the pool"
    assert seen == [None] * len(seen), seen

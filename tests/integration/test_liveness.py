"""Liveness: every running job is covered by its process's heartbeat, on the database's
clock, and ``reap()`` never fails a live job.

A process beats ONE row of the worker table, whatever the number of its jobs; a job's
row names that process (``worker_id``). Live jobs are run here in each way a job can run
(inline checkpoints, ``watch=True``, ``async with``) while a reaper runs with
``stale_after`` = three heartbeat periods; dead ones are real subprocesses killed with
SIGKILL. A job whose row leaves ``in_progress`` by another hand (a reap of a stalled
worker, an operator's UPDATE) is fenced: its worker stops and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, update

from dbcancel import Cancelled, Jobs, Status
from dbcancel._aio import watching
from dbcancel._liveness import worker_id
from dbcancel._sqla import SQLAlchemyBackend
from dbcancel.models import worker_table
from tests.models import Analysis, Base, Result

ROOT = Path(__file__).resolve().parents[2]
TABLE = Analysis.__table__
WORKERS = worker_table(Base.metadata)
PERIOD = 0.2
STALE_AFTER = 3 * PERIOD
MODES = ["inline", "watched", "asyncio"]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling rows that nothing signals


def read(db: Any, job: int) -> dict[str, Any]:
    with db.engine.connect() as conn:
        return dict(conn.execute(select(TABLE).where(TABLE.c.id == job)).mappings().one())


def make_stale(db: Any, worker: str, seconds: float = 3600) -> None:
    """What a stalled process (stopped, swapped out) leaves: a worker row gone quiet,
    its last beat and the expiry that beat promised both ``seconds`` in the past."""
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with db.engine.begin() as conn:
        done = conn.execute(
            update(WORKERS).where(WORKERS.c.id == worker).values(heartbeat_at=old, expires_at=old)
        )
        if done.rowcount == 0:
            # No row: this process beat the database less than a period ago, in an
            # earlier test whose rows the fixture removed, so its job joined without a
            # beat. Write the row its last beat would have left, gone quiet.
            conn.execute(
                WORKERS.insert().values(id=worker, started_at=old, heartbeat_at=old, expires_at=old)
            )


def reap_stalled(db: Any, jobs: Jobs) -> int:
    """Make this process look stalled and reap: what it reaped. Again while a beat
    lands in between: the runtime keeps beating for a moment after an earlier test's
    jobs left (it promised a beat within their shorter period), and such a beat
    refreshes the row just made stale."""
    deadline = time.monotonic() + 30
    while True:
        make_stale(db, worker_id())
        reaped = jobs.reap(stale_after=30)
        if reaped or time.monotonic() > deadline:
            return reaped
        time.sleep(0.05)


class Reaper:
    """Reaps every ``every`` seconds in a thread, as an operator's cron job would."""

    def __init__(self, jobs: Jobs, stale_after: float, every: float = 0.05) -> None:
        self.reaped = 0
        self.rounds = 0
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(every):
                self.reaped += jobs.reap(stale_after)
                self.rounds += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def run_in_mode(jobs: Jobs, job: int, mode: str, until: threading.Event) -> None:
    """Run ``job`` until ``until`` is set, checking it the way ``mode`` says."""
    if mode == "asyncio":

        async def main() -> None:
            async with jobs.run(job) as cp, watching(cp):
                while not until.is_set():
                    if cp.cancelled:
                        raise Cancelled(job, cp.reason)
                    await asyncio.sleep(0.01)

        asyncio.run(main())
        return
    with jobs.run(job) as cp:
        while not until.wait(0.01):
            cp()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_live_jobs_are_never_reaped(db, mode):
    """Four live jobs for ten heartbeat periods, reaped every 50 ms: none is touched."""
    watch = mode == "watched"
    jobs = db.jobs(interval=0.05, heartbeat=PERIOD, watch=watch)
    ids = [db.add() for _ in range(4)]
    done = threading.Event()
    errors: list[BaseException] = []

    def work(job: int) -> None:
        try:
            run_in_mode(jobs, job, mode, done)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(job,)) for job in ids]
    for t in threads:
        t.start()
    wait_until(lambda: all(read(db, j)["status"] is Status.IN_PROGRESS for j in ids), 30, "start")
    reaper = Reaper(jobs, STALE_AFTER)
    time.sleep(10 * PERIOD)  # the span under test: reaps race live heartbeats
    reaper.stop()
    done.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert reaper.rounds > 3  # reaps did race the beats (fewer on a loaded machine)
    assert reaper.reaped == 0
    for job in ids:
        row = read(db, job)
        assert (row["status"], row["error"]) == (Status.COMPLETED, None)
        assert row["worker_id"] == worker_id()


def test_heartbeat_writes_grow_with_processes_not_jobs(db):
    """200 jobs running in one process: one write of its worker row per period."""
    jobs = db.jobs(interval=3600, heartbeat=0.1)
    writes: list[float] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        head = statement.lstrip().split(None, 3)
        if head[:1] in (["UPDATE"], ["INSERT"]) and "dbcancel_worker" in statement[:60]:
            writes.append(time.monotonic())

    ids = [db.add() for _ in range(200)]
    event.listen(db.engine, "before_cursor_execute", count)
    try:
        with contextlib.ExitStack() as stack:
            for job in ids:
                stack.enter_context(jobs.run(job))
            started = time.monotonic()
            time.sleep(1.0)  # ten periods, watched from outside
            elapsed = time.monotonic() - started
            during = [t for t in writes if t >= started]
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    periods = elapsed / 0.1
    assert len(during) <= periods / 0.9 + 1, (len(during), periods)
    assert len(during) >= periods / 3, "the heartbeat must keep beating"


# -- fencing -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inline", "watched"])
def test_a_reaped_worker_that_comes_back_is_fenced(db, mode, caplog):
    """Its process stalled long enough to be reaped: when it runs again, its job is no
    longer in progress; it stops at its next checkpoint and writes no result."""
    caplog.set_level(logging.WARNING, logger="dbcancel")
    jobs = db.jobs(interval=0.05, heartbeat=3600, watch=mode == "watched")
    job = db.add()
    entered, stopped = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def work() -> None:
        with jobs.run(job) as cp:
            entered.set()
            try:
                while True:
                    cp()
                    time.sleep(0.005)
            except Cancelled as exc:
                seen["reason"] = exc.reason
                raise
            finally:
                stopped.set()
            with db.sessions.begin() as s:  # never reached: the result of the job
                s.add(Result(analysis_id=job, value="late"))
                cp.complete(s)

    t = threading.Thread(target=work)
    t.start()
    assert entered.wait(30)
    assert reap_stalled(db, jobs) == 1
    assert stopped.wait(30)
    t.join(30)
    row = read(db, job)
    assert (row["status"], row["error"]) == (Status.FAILED, "worker lost")
    assert seen == {"reason": "failed: worker lost"}
    with db.sessions() as s:
        assert s.scalars(select(Result).where(Result.analysis_id == job)).all() == []
    fenced = [r for r in caplog.records if "not in progress" in r.getMessage()]
    assert len(fenced) == 1


def test_an_operators_update_fences_the_worker_and_keeps_its_status(db, caplog):
    caplog.set_level(logging.WARNING, logger="dbcancel")
    jobs = db.jobs(interval=0.05)
    job = db.add()
    with jobs.run(job) as cp:
        with db.engine.begin() as conn:
            conn.execute(
                update(TABLE).where(TABLE.c.id == job).values(status="failed", error="by ops")
            )

        def loop() -> None:
            for _ in range(10_000):
                cp()
                time.sleep(0.001)

        with pytest.raises(Cancelled) as info:
            loop()
        assert info.value.reason == "failed: by ops"
        assert cp.cancelled
    row = read(db, job)
    assert (row["status"], row["error"]) == (Status.FAILED, "by ops")
    assert row["finished_at"] is not None  # the worker says when it really stopped
    assert len([r for r in caplog.records if "not in progress" in r.getMessage()]) == 1


def test_complete_after_a_reap_is_refused_and_rolls_the_result_back(db):
    jobs = db.jobs(interval=3600, heartbeat=3600)
    job = db.add()
    with jobs.run(job) as cp:
        assert reap_stalled(db, jobs) == 1

        def store() -> None:
            with db.sessions.begin() as s:
                s.add(Result(analysis_id=job, value="late"))
                cp.complete(s)

        with pytest.raises(Cancelled):
            store()
    assert read(db, job)["status"] is Status.FAILED
    with db.sessions() as s:
        assert s.scalars(select(Result).where(Result.analysis_id == job)).all() == []


def test_a_process_whose_row_was_reaped_beats_again(db):
    jobs = db.jobs(interval=3600, heartbeat=PERIOD)
    job = db.add()
    with jobs.run(job):
        pass
    make_stale(db, worker_id())
    assert jobs.reap(stale_after=30) == 0  # nothing ran: its row just goes
    with db.engine.connect() as conn:
        assert conn.execute(select(WORKERS).where(WORKERS.c.id == worker_id())).first() is None
    # A real stall outlasts stale_after, so its last beat is old for the process too.
    time.sleep(PERIOD * 1.5)
    second = db.add()
    with jobs.run(second):
        assert jobs.reap(stale_after=30) == 0
        with db.engine.connect() as conn:
            beat = conn.execute(
                select(WORKERS.c.heartbeat_at).where(WORKERS.c.id == worker_id())
            ).scalar_one()
        assert abs(beat - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=30)
    assert read(db, second)["status"] is Status.COMPLETED


# -- dead workers, clocks ------------------------------------------------------------------

CHILD = """
import sys, time
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis

url, job, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
engine = create_engine(url)
jobs = Jobs(engine, Analysis, interval=0.05, heartbeat=period)
with jobs.run(job) as cp:
    print("started", flush=True)
    while True:
        cp()
        time.sleep(0.005)
"""


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    files: list[Any] = []

    def start(url: str, job: int, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        err = (tmp_path / f"child-{len(procs)}.err").open("w")
        files.append(err)
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(job), str(PERIOD)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, **(env or {})},
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        err.flush()
        assert line.strip() == "started", (tmp_path / f"child-{len(procs) - 1}.err").read_text()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    for file in files:
        file.close()


def reaped_within(jobs: Jobs, bound: float) -> float:
    """Reap every 20 ms until one job is reaped; how long that took."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if jobs.reap(STALE_AFTER):
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"nothing was reaped within {bound}s")


def test_a_killed_worker_is_reaped_within_stale_after_plus_a_period(db, spawn):
    jobs = db.jobs(interval=0.05)
    job = db.add()
    child = spawn(db.url, job)
    assert jobs.reap(STALE_AFTER) == 0
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    waited: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: waited.update(status=jobs.wait(job, timeout=60)))
    waiter.start()
    took = reaped_within(jobs, 30)
    # Generous: the bound is stale_after + one period, plus a loaded machine's slack.
    assert took <= STALE_AFTER + PERIOD + 2.0
    waiter.join(30)
    assert waited == {"status": Status.FAILED}
    assert read(db, job)["error"] == "worker lost"


def faketime(shift: str) -> dict[str, str]:
    """The environment that shifts a process's wall clock by ``shift`` (libfaketime)."""
    libfaketime = pytest.importorskip("libfaketime")
    ok, env = libfaketime.get_reload_information()
    assert ok
    return {**env, "FAKETIME": shift}


SERVERS = pytest.mark.parametrize(
    "database",
    [
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)


@SERVERS
@pytest.mark.slow
@pytest.mark.parametrize("shift", ["+1h", "-1h"])
def test_a_worker_with_a_wrong_clock_is_judged_by_the_databases(db, spawn, shift):
    """Its own timestamps are an hour off; its heartbeat is the server's: neither reaped
    while alive, nor kept alive once killed. (SQLite has no clock of its own but the
    machine's, which every process on it shares.)"""
    jobs = db.jobs(interval=0.05)
    job = db.add()
    child = spawn(db.url, job, env=faketime(shift))
    started_at = read(db, job)["started_at"]
    assert abs(started_at - dt.datetime.now(dt.UTC)) > dt.timedelta(minutes=50)  # it is off
    reaper = Reaper(jobs, STALE_AFTER)
    time.sleep(8 * PERIOD)
    reaper.stop()
    assert reaper.reaped == 0
    assert read(db, job)["status"] is Status.IN_PROGRESS
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert reaped_within(jobs, 30) <= STALE_AFTER + PERIOD + 2.0
    assert jobs.wait(job, timeout=5) is Status.FAILED


def test_worker_row_names_host_and_process(db):
    jobs = db.jobs(heartbeat=PERIOD)
    job = db.add()
    with jobs.run(job):
        pass
    _host, pid, token = read(db, job)["worker_id"].split(":")
    assert (int(pid), len(token)) == (os.getpid(), 8)
    with db.engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(WORKERS).where(WORKERS.c.id == worker_id())
        ).scalar_one()
    assert count == 1


def test_a_missing_worker_table_is_named_and_nothing_starts(tmp_path):
    """A job table created alone (``Table.create()``, an old migration): no job may run
    without a heartbeat, so run() refuses with what to do, and the job stays pending."""
    from sqlalchemy import create_engine, insert, select

    from dbcancel import DbcancelError

    engine = create_engine(f"sqlite:///{tmp_path / 'alone.db'}")
    try:
        TABLE.create(engine)
        with engine.begin() as conn:
            job = conn.execute(insert(TABLE).values(user_id="a", session_id="s")).lastrowid
        jobs = Jobs(engine, Analysis)
        missing = r"worker table 'dbcancel_worker' .* does not exist.*create_all"
        with pytest.raises(DbcancelError, match=missing):
            jobs.run(job).__enter__()
        with pytest.raises(DbcancelError, match=missing):
            jobs.status(job)  # every use names it, not only run()
        with engine.connect() as conn:
            status = conn.execute(select(TABLE.c.status).where(TABLE.c.id == job)).scalar_one()
        assert status == Status.PENDING.value
    finally:
        engine.dispose()


# -- the period a worker row records -------------------------------------------------------


class OwnHeartbeat:
    """The SQLAlchemy backend of ``db``'s table with a worker key of its own: ``Jobs`` on
    it share a heartbeat of their own, which beats as its first job starts. The worker
    row is the process's (``worker_id()``). It notes each beat's period."""

    def __init__(self, db: Any) -> None:
        self._inner = SQLAlchemyBackend(db.engine, Analysis)
        self.worker_key = ("test-own-heartbeat", id(self))
        self.periods: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def beat_worker(self, worker: str, period: float) -> None:
        self._inner.beat_worker(worker, period)
        self.periods.append(period)  # once written: the row shows it


def worker_row(db: Any) -> tuple[dt.datetime, dt.datetime]:
    with db.engine.connect() as conn:
        found = conn.execute(
            select(WORKERS.c.heartbeat_at, WORKERS.c.expires_at).where(WORKERS.c.id == worker_id())
        ).one()
    return found[0], found[1]


def test_the_worker_row_records_the_shortest_period_it_beats_at(db):
    """Jobs with heartbeat=3 and heartbeat=0.1 in one process: the row promises three of
    the shorter periods, the one its heartbeat beats at."""
    seam = OwnHeartbeat(db)
    slow = Jobs.from_backend(seam, interval=3600, heartbeat=3)
    fast = Jobs.from_backend(seam, interval=3600, heartbeat=0.1)
    first, second = db.add(), db.add()
    with slow.run(first):
        assert seam.periods[0] == 3  # as the job started
        beat, expires = worker_row(db)
        assert expires - beat == dt.timedelta(seconds=9)
        with fast.run(second):
            wait_until(lambda: 0.1 in seam.periods, 30, "a beat at the shorter period")
            beat, expires = worker_row(db)
            # Three of the shorter periods (SQLite's clock keeps milliseconds).
            assert dt.timedelta(seconds=0.299) <= expires - beat <= dt.timedelta(seconds=0.3)
        assert set(seam.periods) == {3, 0.1}
    assert slow.status(first) is Status.COMPLETED


def test_a_worker_whose_short_period_job_left_beats_within_the_period_it_recorded(db):
    """The last beat promised three periods of 0.1 s; when the job with that period
    leaves, the next beat still comes within 0.1 s (not after the 30 s of the job still
    running), so that a reaper trusting the row's expiry never finds it passed."""
    seam = OwnHeartbeat(db)
    slow = Jobs.from_backend(seam, interval=3600, heartbeat=30)
    fast = Jobs.from_backend(seam, interval=3600, heartbeat=0.1)
    first, second = db.add(), db.add()
    with slow.run(first):
        with fast.run(second):
            wait_until(lambda: 0.1 in seam.periods, 30, "a beat at the shorter period")
        beats = len(seam.periods)
        wait_until(lambda: len(seam.periods) > beats, 10, "a beat after the fast job left")
        assert seam.periods[beats] == 30  # it now records the period of the jobs left
        assert slow.reap(0.5) == 0

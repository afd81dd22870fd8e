"""``Jobs(watch=True)``: one watcher per process and table, reap, NOTIFY.

Cancels "from another process" are written here either by a real subprocess or by a
plain SQL UPDATE on another connection: neither reaches this process's registry, so only
the watcher (its poll, or on PostgreSQL its LISTEN connection) can deliver them.

Some tests wait for a state that nothing signals (a heartbeat written, a listener
reconnected) with :func:`wait_until`, which re-checks every 20 ms up to a generous bound.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from dbcancel import Cancelled, Jobs, Status
from dbcancel._liveness import worker_id
from dbcancel._runtime import runtime
from dbcancel.backend import cancel_payload, end_payload
from dbcancel.models import worker_table
from tests.models import Analysis, Base

ROOT = Path(__file__).resolve().parents[2]
TABLE = Analysis.__table__
WORKERS = worker_table(Base.metadata)
INTERVAL = 0.2


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def cancel_behind_our_back(db: Any, *ids: int, reason: str = "elsewhere") -> None:
    """What a cancel in another process does to the row, without telling this process."""
    with db.engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id.in_(ids), TABLE.c.status.in_(["pending", "in_progress"]))
            .values(status="cancelled", cancel_reason=reason)
        )


BACKEND_NAMES = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mysql"}


def watcher_threads(db: Any) -> list[threading.Thread]:
    """The runtime threads of this process's runtime (one, however many tables and
    databases it serves); a copy of dbcancel that an inline pytester run imported has
    threads of the same name, told apart by the runtime they run."""
    ours = runtime()

    def runtime_of(thread: threading.Thread) -> Any:
        return getattr(getattr(thread, "_target", None), "__self__", None)

    return [
        t
        for t in threading.enumerate()
        if t.name == "dbcancel-runtime" and runtime_of(t) is ours and t.is_alive()
    ]


class StatusQueries:
    """Counts the statements the watcher thread sends that read the job table's status."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.count = 0
        self.heartbeats = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not threading.current_thread().name.startswith("dbcancel-runtime"):
            return
        sql = " ".join(statement.split()).upper()
        if "ANALYSIS" not in sql:
            return
        if sql.startswith("SELECT") or "RETURNING" in sql:
            self.count += 1
        elif sql.startswith("UPDATE"):
            self.heartbeats += 1  # a write of a job row: the watcher makes none

    def reset(self) -> None:
        self.count = self.heartbeats = 0

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture
def queries(db: Any) -> Iterator[StatusQueries]:
    counter = StatusQueries(db.engine)
    yield counter
    counter.close()


# -- the watcher -------------------------------------------------------------------------


def test_a_watched_checkpoint_never_queries_and_sees_a_cancel_from_elsewhere(db, queries):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    job = db.add()
    calls: list[str] = []
    with jobs.run(job) as cp:
        assert cp.watched
        seen = threading.Event()
        cp.on_cancel(seen.set)
        cp.on_cancel(lambda: calls.append(threading.current_thread().name))
        cancel_behind_our_back(db, job, reason="from another process")
        assert seen.wait(INTERVAL * 1.1 + 5), "the watcher never delivered the cancel"
        with pytest.raises(Cancelled) as info:
            cp()
        assert info.value.reason == "from another process"
    # The callbacks ran in the watcher's thread, not in a worker's.
    assert calls
    assert calls[0].startswith("dbcancel-runtime")
    assert jobs.status(job) is Status.CANCELLED
    assert jobs.wait(job, timeout=5) is Status.CANCELLED


def test_callbacks_run_while_the_worker_is_blocked(db):
    """The worker thread is stuck (in I/O, say); only the watcher can unblock it."""
    jobs = db.jobs(interval=INTERVAL, watch=True)
    job = db.add()
    blocked = threading.Event()
    entered = threading.Event()
    outcome: dict[str, object] = {}

    def worker() -> None:
        with jobs.run(job) as cp:
            cp.on_cancel(blocked.set)  # e.g. closing the socket the worker waits on
            entered.set()
            blocked.wait()
            outcome["cancelled"] = cp.cancelled
            cp()

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    cancel_behind_our_back(db, job)
    thread.join(INTERVAL * 1.1 + 10)
    assert not thread.is_alive(), "the blocked worker was never released"
    assert outcome == {"cancelled": True}
    assert jobs.status(job) is Status.CANCELLED


@pytest.mark.serial  # a thousand threads: alone, it takes a quarter of the time
def test_one_batched_query_per_interval_for_1000_jobs(db, queries):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    ids = [db.add() for _ in range(1000)]
    seen = {job: threading.Event() for job in ids}
    with contextlib.ExitStack() as stack:
        cps = {}
        for job in ids:
            cps[job] = stack.enter_context(jobs.run(job))
            cps[job].on_cancel(seen[job].set)
        assert len(watcher_threads(db)) == 1

        queries.reset()
        window = 10 * INTERVAL
        time.sleep(window)  # the measurement window, not a synchronisation
        # One statement per poll (jitter +-10 %), whatever the number of jobs.
        assert 1 <= queries.count <= 2 * window / INTERVAL, queries.count
        assert queries.heartbeats == 0  # and no writes of job rows

        # Half the jobs cancelled elsewhere: every one observed within interval + margin.
        cancelled = ids[::2]
        cancel_behind_our_back(db, *cancelled)
        written = time.monotonic()
        for job in cancelled:
            assert seen[job].wait(max(0.0, written + INTERVAL * 1.1 + 3 - time.monotonic())), job
        late = time.monotonic() - written
        assert late < INTERVAL * 1.1 + 3
        assert not any(cps[job].cancelled for job in ids[1::2])
    assert len(watcher_threads(db)) == 1


def test_the_watcher_idles_when_no_job_runs(db, queries):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    job = db.add()
    with jobs.run(job):
        wait_until(lambda: queries.count >= 1, 10, "a first poll")
    queries.reset()
    time.sleep(5 * INTERVAL)  # the measurement window
    assert queries.count == 0
    assert queries.heartbeats == 0
    assert jobs.stats().active_jobs == 0


def test_one_runtime_thread_however_many_jobs_objects_and_threads(db):
    many = [db.jobs(interval=INTERVAL * (1 + i % 3), watch=True) for i in range(5)]
    ids = [db.add() for _ in range(20)]
    go = threading.Event()
    entered = threading.Barrier(len(ids) + 1)
    errors: list[BaseException] = []

    def worker(jobs: Jobs, job: int) -> None:
        try:
            with jobs.run(job):
                entered.wait(20)
                go.wait(20)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [
        threading.Thread(target=worker, args=(many[i % len(many)], job))
        for i, job in enumerate(ids)
    ]
    for t in threads:
        t.start()
    entered.wait(20)
    try:
        assert len(watcher_threads(db)) == 1
    finally:
        go.set()
        for t in threads:
            t.join(20)
    assert not errors


def test_jobs_that_found_their_job_cancelled_are_not_watched(db, queries):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    job = db.add()
    jobs.cancel(job)
    queries.reset()
    with pytest.raises(Cancelled):
        jobs.run(job).__enter__()
    served = runtime().database_of(jobs._backend)
    table = None if served is None else served.tables.get(jobs._backend.key)
    assert table is None or not table.watched


def test_stats_count_polls_and_show_the_watcher(db):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    job = db.add()
    before = jobs.stats()
    with jobs.run(job):
        wait_until(lambda: jobs.stats().polls >= before.polls + 2, 10, "two polls")
        stats = jobs.stats()
        assert stats.active_jobs == 1
        assert stats.watching is True
        assert stats.listening is (db.name == "postgresql")
        assert stats.outage is None


def test_watch_refuses_a_custom_clock(db):
    with pytest.raises(ValueError, match="real time"):
        db.jobs(watch=True, clock=time.monotonic)
    with pytest.raises(TypeError, match="watch must be None, True or False"):
        db.jobs(watch="yes")


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan")])
def test_max_staleness_must_be_positive_seconds(db, bad):
    with pytest.raises(ValueError, match="max_staleness"):
        db.jobs(max_staleness=bad)
    with pytest.raises(TypeError, match="max_staleness"):
        db.jobs(max_staleness="10")


# -- heartbeats and reap -----------------------------------------------------------------


def read(db: Any, job: int) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(select(TABLE).where(TABLE.c.id == job)).one()._mapping


def test_the_watcher_only_reads_job_rows(db, queries):
    """Liveness is the process's worker row: the watcher's poll writes no job row."""
    jobs = db.jobs(interval=INTERVAL, watch=True, heartbeat=INTERVAL)
    job = db.add()
    with jobs.run(job):
        beats = jobs.stats().heartbeats
        wait_until(lambda: queries.count >= 3, 10, "three polls")
        wait_until(lambda: jobs.stats().heartbeats > beats, 10, "a heartbeat")
    assert queries.heartbeats == 0
    assert read(db, job)["heartbeat_at"] is None


def test_reap_leaves_live_and_finished_jobs_alone(db):
    jobs = db.jobs(interval=INTERVAL, watch=True, heartbeat=INTERVAL)
    live, done, pending = db.add(), db.add(), db.add()
    with jobs.run(done):
        pass
    with jobs.run(live):
        beats = jobs.stats().heartbeats
        wait_until(lambda: jobs.stats().heartbeats > beats + 1, 10, "two heartbeats")
        assert jobs.reap(stale_after=INTERVAL * 10) == 0
        assert jobs.status(live) is Status.IN_PROGRESS
    assert jobs.status(done) is Status.COMPLETED
    assert jobs.status(pending) is Status.PENDING


def backdate(db: Any, job: int, seconds: float, **values: Any) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with db.engine.begin() as conn:
        conn.execute(
            update(TABLE)
            .where(TABLE.c.id == job)
            .values(heartbeat_at=old, started_at=old, **values)
        )


def test_reap_fails_stale_running_jobs_and_stops_stale_cancelled_ones(db):
    jobs = db.jobs()
    running, cancelled, fresh, no_heartbeat = db.add(), db.add(), db.add(), db.add()
    backdate(db, running, 60, status="in_progress")
    backdate(db, cancelled, 60, status="cancelled", cancel_reason="user")
    backdate(db, fresh, 1, status="in_progress")
    backdate(db, no_heartbeat, 60, status="in_progress")
    with db.engine.begin() as conn:
        conn.execute(update(TABLE).where(TABLE.c.id == no_heartbeat).values(heartbeat_at=None))
    with pytest.raises(TimeoutError):
        jobs.wait(cancelled, timeout=0.1)

    assert jobs.reap(stale_after=30) == 3
    r = read(db, running)
    assert (r["status"], r["error"]) == (Status.FAILED, "worker lost")
    assert r["finished_at"] is not None
    c = read(db, cancelled)
    assert (c["status"], c["error"], c["cancel_reason"]) == (Status.CANCELLED, None, "user")
    assert c["finished_at"] is not None
    assert read(db, no_heartbeat)["status"] is Status.FAILED  # judged by started_at
    assert read(db, fresh)["status"] is Status.IN_PROGRESS
    assert jobs.wait(running, timeout=1) is Status.FAILED
    assert jobs.wait(cancelled, timeout=1) is Status.CANCELLED
    assert jobs.reap(stale_after=30) == 0  # nothing twice


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf")])
def test_reap_refuses_bad_stale_after_and_changes_nothing(db, bad):
    jobs = db.jobs()
    job = db.add()
    backdate(db, job, 60, status="in_progress")
    with pytest.raises(ValueError, match="stale_after"):
        jobs.reap(stale_after=bad)
    with pytest.raises(TypeError, match="stale_after"):
        jobs.reap(stale_after="30")  # type: ignore[arg-type]
    assert read(db, job)["status"] is Status.IN_PROGRESS


# -- other processes ---------------------------------------------------------------------


CHILD = """
import sys, time
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis

url, interval = sys.argv[1], float(sys.argv[2])
engine = create_engine(url)
jobs = Jobs(engine, Analysis, interval=interval, watch=True, heartbeat=interval)
print("ready", flush=True)
for line in sys.stdin:
    job = int(line)
    with jobs.run(job) as cp:
        print("started", job, flush=True)
        while True:
            cp()
            sum(i * i for i in range(300))  # about 20-50 us of work holding the GIL
    print("stopped", job, repr(time.time()), flush=True)
engine.dispose()
"""


class Child:
    """A worker process running CHILD: it runs the jobs whose ids it reads on stdin."""

    def __init__(self, errors: Path, url: str, interval: float) -> None:
        self._errors_path = errors
        self._errors = errors.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(interval)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.expect("ready", 60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def run(self, job: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{job}\n")
        self.proc.stdin.flush()
        self.expect("started", 30)

    def expect(self, word: str, timeout: float) -> list[str]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the child printed nothing in {timeout}s:\n{self.stderr()}")
        if line is None or line.split()[:1] != [word]:
            pytest.fail(f"expected {word!r} from the child, got {line!r}:\n{self.stderr()}")
        return line.split()

    def stderr(self) -> str:
        self._errors.flush()
        return self._errors_path.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._errors.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[str, float], Child]]:
    children: list[Child] = []

    def start(url: str, interval: float) -> Child:
        child = Child(tmp_path / f"child-{len(children)}.err", url, interval)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


def test_a_killed_worker_is_reaped_and_wait_returns(db, spawn):
    jobs = db.jobs(interval=INTERVAL)
    child = spawn(db.url, INTERVAL)
    job = db.add()
    child.run(job)
    assert read(db, job)["worker_id"].split(":")[1] == str(child.proc.pid)
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(10)

    waited: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: waited.update(status=jobs.wait(job, timeout=60)))
    waiter.start()
    # Its heartbeat goes stale: reap as an operator's cron job would, every interval.
    reaped = 0
    deadline = time.monotonic() + 30
    while not reaped and time.monotonic() < deadline:
        reaped = jobs.reap(stale_after=1.0)
        time.sleep(INTERVAL)
    assert reaped == 1
    waiter.join(30)
    assert waited == {"status": Status.FAILED}
    assert read(db, job)["error"] == "worker lost"


def test_a_worker_killed_after_a_cancel_is_reaped_as_stopped(db, spawn):
    """Cancel, the worker dies before it stops: without reap, wait() would never return."""
    jobs = db.jobs(interval=INTERVAL)
    child = spawn(db.url, INTERVAL)
    job = db.add()
    child.run(job)
    # Killed before the cancel reaches it (not frozen with SIGSTOP: a process stopped
    # inside a SQLite read would hold the file's lock, and the cancel could not commit).
    os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait(10)
    assert jobs.cancel(job, reason="user deleted it")
    with pytest.raises(TimeoutError):
        jobs.wait(job, timeout=0.5)
    backdate(db, job, 60)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60)
    with db.engine.begin() as conn:  # its worker row, as a minute of silence leaves it
        conn.execute(
            update(WORKERS)
            .values(heartbeat_at=old, expires_at=old)
            .where(WORKERS.c.id != worker_id())
        )
    assert jobs.reap(stale_after=30) == 1
    assert jobs.wait(job, timeout=5) is Status.CANCELLED
    row = read(db, job)
    assert (row["cancel_reason"], row["error"]) == ("user deleted it", None)


def test_cancel_in_another_process_is_observed_within_an_interval(db, spawn):
    jobs = db.jobs(interval=INTERVAL)
    child = spawn(db.url, INTERVAL)
    job = db.add()
    child.run(job)
    assert jobs.cancel(job, reason="stop")
    cancelled = time.time()
    _, stopped_job, at = child.expect("stopped", 30)
    assert int(stopped_job) == job
    assert float(at) - cancelled < INTERVAL * 1.1 + 2
    assert jobs.wait(job, timeout=10) is Status.CANCELLED
    row = read(db, job)
    assert row["cancel_requested_at"] <= row["cancel_observed_at"] <= row["finished_at"]


def test_fork_child_watches_its_own_jobs(db):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    parent_job, child_job = db.add(), db.add()
    with jobs.run(parent_job):
        assert len(watcher_threads(db)) == 1
        parent_thread = watcher_threads(db)[0]
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                db.engine.dispose(close=False)  # the parent's pooled connections are its own
                with jobs.run(child_job) as cp:
                    threads = watcher_threads(db)
                    ok = len(threads) == 1 and threads[0] is not parent_thread
                    seen = threading.Event()
                    cp.on_cancel(seen.set)
                    cancel_behind_our_back(db, child_job)
                    ok = ok and seen.wait(INTERVAL * 1.1 + 10)
                code = 0 if ok and len(watcher_threads(db)) == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert watcher_threads(db) == [parent_thread]  # the parent's is untouched
    assert jobs.status(child_job) is Status.CANCELLED
    assert jobs.wait(child_job, timeout=5) is Status.CANCELLED


def test_the_watcher_does_not_keep_the_interpreter_alive(db, tmp_path):
    script = f"""
import threading
from sqlalchemy import create_engine
from dbcancel import Jobs
from tests.models import Analysis
engine = create_engine({db.url!r})
jobs = Jobs(engine, Analysis, interval=0.1, watch=True)
with jobs.run({db.add()}) as cp:
    cp()
assert any(t.name.startswith("dbcancel-runtime") for t in threading.enumerate())
print("done", flush=True)
"""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert time.monotonic() - started < 60


# -- outages -----------------------------------------------------------------------------


@contextlib.contextmanager
def table_gone(db: Any) -> Iterator[None]:
    """A real database error for every poll: the table is renamed away for a while."""
    other = f"analysis_gone_{uuid.uuid4().hex[:6]}"
    rename = "RENAME TABLE {} TO {}" if db.name == "mariadb" else "ALTER TABLE {} RENAME TO {}"
    with db.engine.begin() as conn:
        conn.execute(text(rename.format("analysis", other)))
    try:
        yield
    finally:
        with db.engine.begin() as conn:
            conn.execute(text(rename.format(other, "analysis")))


def test_an_outage_does_not_stop_a_watched_job_by_default(db, caplog):
    jobs = db.jobs(interval=INTERVAL, watch=True)
    job = db.add()
    caplog.set_level(logging.WARNING, logger="dbcancel")
    with jobs.run(job) as cp:
        errors = jobs.stats().poll_errors
        with table_gone(db):
            wait_until(lambda: jobs.stats().poll_errors >= errors + 3, 30, "failing polls")
            assert jobs.stats().outage is not None
            assert not cp.cancelled
        cancel_behind_our_back(db, job)
        wait_until(lambda: cp.cancelled, 30, "the cancel after the outage")
    stats = jobs.stats()
    assert stats.outage is None
    assert stats.last_outage is not None
    assert stats.last_outage > 0
    failed = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(failed) == 1  # once per outage, not once per poll


@pytest.mark.parametrize("leave", ["during the outage", "after it"])
def test_max_staleness_cancels_a_watched_job_locally(db, caplog, leave):
    jobs = db.jobs(interval=INTERVAL, watch=True, max_staleness=1.0)
    job = db.add()
    caplog.set_level(logging.WARNING, logger="dbcancel")
    run = jobs.run(job)
    cp = run.__enter__()
    seen = threading.Event()
    cp.on_cancel(seen.set)
    with table_gone(db):
        broken = time.monotonic()
        assert seen.wait(30), "the job was not cancelled locally"
        assert time.monotonic() - broken >= 1.0 - 2 * INTERVAL
        assert "max_staleness=1.0s" in (cp.reason or "")
        with pytest.raises(Cancelled) as info:
            cp()
        if leave == "during the outage":
            # The row cannot be told: logged, and the worker still stops cleanly.
            assert run.__exit__(Cancelled, info.value, None) is True
            assert any("could not be updated" in r.getMessage() for r in caplog.records)
    if leave == "during the outage":
        row = read(db, job)
        assert (row["status"], row["finished_at"]) == (Status.IN_PROGRESS, None)  # for reap
        return
    assert run.__exit__(Cancelled, info.value, None) is True
    row = read(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["cancel_reason"] == cp.reason
    assert row["finished_at"] is not None
    assert row["cancel_observed_at"] is not None


# -- PostgreSQL: NOTIFY ------------------------------------------------------------------


# LISTEN/NOTIFY is PostgreSQL's: these tests run there only (not skipped elsewhere).
postgresql_only = pytest.mark.parametrize(
    "database", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)


@pytest.fixture
def pg(db: Any) -> Any:
    assert db.name == "postgresql"
    return db


@contextlib.contextmanager
def listening(db: Any, channel: str) -> Iterator[Any]:
    import psycopg
    from psycopg import sql

    url = make_url(db.url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield conn


def payloads(conn: Any, timeout: float) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=timeout)]


@postgresql_only
def test_cancel_notifies_in_its_transaction_and_only_when_it_changed_a_row(pg):
    jobs = pg.jobs()
    first, second, third = pg.add(session_id="x"), pg.add(session_id="x"), pg.add()
    with listening(pg, jobs._backend.channel) as conn:
        assert jobs.cancel(first) is True
        assert payloads(conn, 1.0) == [cancel_payload(first, None)]
        assert jobs.cancel(first) is True  # already cancelled: nothing changed, no notify
        assert jobs.cancel_where(session_id="x") == 1
        assert payloads(conn, 1.0) == ["*"]  # cancel_where: "poll now", whoever you are
        with jobs.run(third):
            pass
        # Its completion announces the end (for wait() elsewhere), not a cancel...
        assert payloads(conn, 1.0) == [end_payload(third)]
        assert jobs.cancel(third) is False
        assert payloads(conn, 0.5) == []  # ... and a cancel that changed nothing, nothing
    assert jobs.status(second) is Status.CANCELLED


@postgresql_only
def test_a_cancel_in_another_schema_never_reaches_this_schemas_job(pg):
    """Notification channels are per database, not per schema: the same table name in
    two schemas must still get two channels, or a cancel of job 7 over there would flip
    the watched job 7 here (a notification that names a job is trusted without a poll)."""
    other = f"{make_url(pg.url).query['options'].split('=', 1)[1]}_other"
    admin = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {other}"))
    url = make_url(pg.url).update_query_dict({"options": f"-csearch_path={other}"})
    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
        here, there = pg.jobs(interval=10.0), Jobs(engine, Analysis, interval=10.0)
        assert here._backend.channel != there._backend.channel
        job = pg.add()
        with engine.begin() as conn:
            conn.execute(Analysis.__table__.insert().values(id=job, status="pending"))
        marker = pg.add()
        with listening(pg, here._backend.channel) as conn, here.run(job) as cp:
            assert there.cancel(job, reason="over there") is True
            assert here.cancel(marker, reason="here") is True
            # The marker's notification was sent after the other schema's: had that one
            # come on this channel, it would be first.
            assert payloads(conn, 2.0) == [cancel_payload(marker, "here")]
            assert not cp.cancelled
            cp()
        assert pg.row(job).status is Status.COMPLETED
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {other} CASCADE"))
        admin.dispose()


@postgresql_only
def test_notify_delivers_a_cancel_long_before_the_interval(pg, spawn):
    """Interval 10 s: only the notification can stop the worker within a second."""
    jobs = pg.jobs(interval=10.0)
    child = spawn(pg.url, 10.0)
    latencies = []
    for _ in range(10):
        job = pg.add()
        child.run(job)
        assert jobs.cancel(job)
        cancelled = time.time()
        _, stopped_job, at = child.expect("stopped", 30)
        assert int(stopped_job) == job
        latencies.append(float(at) - cancelled)
    latencies.sort()
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    assert p95 < 1.0, latencies


def terminate(pg: Any, application_name: str) -> list[int]:
    with pg.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE :name"
            ),
            {"name": application_name + "%"},
        ).all()
    return [pid for pid, _ in rows]


@contextlib.contextmanager
def schema_of_its_own(pg: Any, suffix: str) -> Iterator[Any]:
    """A URL whose search_path is a new schema with the test tables: a table of the
    test's own, whose watcher is of the test's own engine (one watcher per table and
    process, whichever engine it was first asked for)."""
    other = f"{make_url(pg.url).query['options'].split('=', 1)[1]}_{suffix}"
    admin = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {other}"))
    url = make_url(pg.url).update_query_dict({"options": f"-csearch_path={other}"})
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {other} CASCADE"))
        admin.dispose()


@postgresql_only
def test_watcher_and_listener_recover_from_terminated_connections(pg, caplog):
    name = f"dbcancel-test-{uuid.uuid4().hex[:8]}"
    with schema_of_its_own(pg, "kill") as own:
        url = own.update_query_dict({"application_name": name})
        engine = create_engine(url)  # no pre-ping: a dead pooled connection fails a poll
        try:
            Base.metadata.create_all(engine)
            with engine.begin() as conn:
                job = conn.execute(TABLE.insert().returning(TABLE.c.id)).scalar_one()
            # Interval 30 s: after the kill, only a working listener can deliver a cancel.
            jobs = Jobs(engine, Analysis, interval=30.0, watch=True)
            with jobs.run(job) as cp:
                wait_until(lambda: jobs.stats().listening, 10, "the listener")
                assert jobs.status(job) is Status.IN_PROGRESS  # a pooled connection, now idle
                killed = terminate(pg, name)
                assert len(killed) >= 2, killed  # the listener and the pooled poll connection
                wait_until(lambda: jobs.stats().listener_errors >= 1, 10, "the listener to break")
                wait_until(lambda: jobs.stats().listening, 10, "the listener to reconnect")

                cli = [sys.executable, "-m", "dbcancel", "cancel", "--url"]
                proc = subprocess.run(
                    [
                        *cli,
                        own.render_as_string(hide_password=False),
                        "--table",
                        "analysis",
                        str(job),
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert proc.returncode == 0, proc.stderr
                wait_until(lambda: cp.cancelled, 10, "the cancel through the new listener")

                # The watcher applies only what its poll reads: that poll, made after the
                # pooled connections were killed, worked.
                assert jobs.stats().outage is None
            assert jobs.stats().outage is None
        finally:
            engine.dispose()


@postgresql_only
def test_an_idle_watcher_closes_its_listener(pg, monkeypatch):
    monkeypatch.setattr("dbcancel._runtime.IDLE_GRACE", 0.2)
    jobs = pg.jobs(interval=INTERVAL, watch=True)
    job = pg.add()
    with jobs.run(job):
        wait_until(lambda: jobs.stats().listening, 10, "the listener")
    wait_until(lambda: not jobs.stats().listening, 10, "the idle listener to close")
    assert not jobs.stats().watching
    assert runtime().stats().running  # the thread stays, asleep until the next job
    with jobs.run(pg.add()):
        wait_until(lambda: jobs.stats().listening, 10, "the listener again")


@postgresql_only
@pytest.mark.parametrize("attempt", range(5))
def test_a_cancel_right_after_the_first_job_started_is_not_lost(pg, attempt):
    """The cancel may commit before the new watcher's LISTEN takes effect: its NOTIFY then
    reaches nobody, and only a poll right after connecting sees it before the interval."""
    url = make_url(pg.url).update_query_dict({"application_name": f"t-{uuid.uuid4().hex[:8]}"})
    # Its own key: a watcher that has not listened yet. No pool: the listener opens a
    # new connection, which takes longer than the cancel below takes to commit.
    engine = create_engine(url, poolclass=NullPool)
    try:
        jobs = Jobs(engine, Analysis, interval=30.0, watch=True)
        job = pg.add()
        with jobs.run(job) as cp:
            with pg.engine.begin() as conn:  # what cancel() in another process commits
                conn.execute(update(TABLE).where(TABLE.c.id == job).values(status="cancelled"))
                conn.execute(select(func.pg_notify(jobs._backend.channel, str(job))))
            wait_until(lambda: cp.cancelled, 10, "the cancel (the interval is 30 s)")
    finally:
        engine.dispose()

"""Every allowed and every forbidden status transition, on every database.

The cases are generated from ``dbcancel.TRANSITIONS``: one test per (from, to) pair of
states, where "to" is reached through the public operation that asks for it:

* ``in_progress``: entering ``jobs.run(id)``;
* ``completed``: leaving ``run()`` normally;
* ``failed``: leaving ``run()`` with an exception;
* ``cancelled``: ``jobs.cancel(id)``.

No operation asks for ``pending``, so the pairs ending there have no case here (the table
itself is checked to allow none of them). A forbidden transition must change nothing in
the row; the only column a refused *exit* from ``run()`` may still write is
``finished_at``, because the worker has then really stopped.
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import inspect, select, text, update

from dbcancel import TRANSITIONS, Cancelled, InvalidTransition, Jobs, Status
from dbcancel._liveness import worker_id
from dbcancel.models import StatusType
from tests.models import Analysis

TABLE = Analysis.__table__
SLACK = dt.timedelta(seconds=2)
FAILURE = "the worker failed"


# -- helpers -------------------------------------------------------------------------------


def read_row(db: Any, job: int) -> dict[str, Any]:
    """The whole row, every column, as the database has it now."""
    with db.engine.connect() as conn:
        row = conn.execute(select(TABLE).where(TABLE.c.id == job)).mappings().one()
    return dict(row)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def assert_between(value: dt.datetime | None, start: dt.datetime, end: dt.datetime) -> None:
    assert value is not None
    assert value.tzinfo is not None, f"{value!r} is not timezone-aware"
    assert start - SLACK <= value <= end + SLACK, (start, value, end)


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a ``with`` block's ``__exit__`` would receive it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def path_from(start: Status, target: Status) -> list[Status] | None:
    """The shortest list of states leading from ``start`` to ``target`` in TRANSITIONS."""
    queue: collections.deque[list[Status]] = collections.deque([[start]])
    seen = {start}
    while queue:
        path = queue.popleft()
        if path[-1] is target:
            return path[1:]
        for nxt in sorted(TRANSITIONS[path[-1]]):
            if nxt not in seen:
                seen.add(nxt)
                queue.append([*path, nxt])
    return None


class Worker:
    """One job and the worker side of it, driven step by step in this thread.

    ``enter()``/``leave()`` are exactly what a ``with jobs.run(id) as cp:`` statement
    calls; doing them by hand lets a test stop between them.
    """

    def __init__(self, db: Any, jobs: Jobs) -> None:
        self.db = db
        self.jobs = jobs
        self.id = db.add()
        self.run: Any = None
        self.cp: Any = None

    def enter(self) -> Any:
        run = self.jobs.run(self.id)
        self.cp = run.__enter__()
        self.run = run
        return self.cp

    def leave(self, exc: BaseException | None = None) -> bool:
        """Leave ``run()``; True when the exception was swallowed, as ``with`` sees it."""
        run, self.run = self.run, None
        if exc is None:
            return bool(run.__exit__(None, None, None))
        exc = raised(exc)
        return bool(run.__exit__(type(exc), exc, exc.__traceback__))

    def step(self, to: Status) -> None:
        """Take one allowed transition through the public operation that asks for it."""
        if to is Status.IN_PROGRESS:
            self.enter()
        elif to is Status.COMPLETED:
            assert self.leave() is False
        elif to is Status.FAILED:
            assert self.leave(RuntimeError("arranged failure")) is False
        elif to is Status.CANCELLED:
            assert self.jobs.cancel(self.id, reason="arranged") is True
        else:  # pragma: no cover - nothing moves a job to pending
            raise AssertionError(to)

    def close(self) -> None:
        if self.run is not None:
            self.leave()


@pytest.fixture
def worker(db: Any) -> Iterator[Worker]:
    # Threadless: these checks pin what the checkpoint has observed at each step, and a
    # watcher's poll between forcing a row behind dbcancel's back and leaving run()
    # fences the worker at a moment of its own choosing (rightly so; the watched mode's
    # fencing is tested in test_liveness.py).
    w = Worker(db, db.jobs(watch=False))
    try:
        yield w
    finally:
        w.close()


def arrange_at_rest(w: Worker, src: Status) -> None:
    """Bring the job to ``src`` along the table's shortest path from pending.

    When ``src`` is in_progress the run stays open (the job has a live worker).
    """
    path = path_from(Status.PENDING, src)
    assert path is not None, f"{src} cannot be reached from pending"
    for state in path:
        w.step(state)
    assert read_row(w.db, w.id)["status"] is src


def arrange_with_open_run(w: Worker, src: Status) -> None:
    """Enter ``run()``, then bring the row to ``src`` while the worker is still inside.

    in_progress: nothing more; cancelled: ``jobs.cancel()``; completed:
    ``cp.complete(session)``, which keeps the run open. No operation moves a running job
    to pending or failed while its worker is inside ``run()``: for those the row is
    changed with raw SQL, as another (misbehaving) actor on the table would.
    """
    w.enter()
    if src is Status.CANCELLED:
        assert w.jobs.cancel(w.id, reason="arranged") is True
    elif src is Status.COMPLETED:
        with w.db.sessions.begin() as s:
            w.cp.complete(s)
    elif src is not Status.IN_PROGRESS:
        with w.db.engine.begin() as conn:
            conn.execute(update(TABLE).where(TABLE.c.id == w.id).values(status=src))
    assert read_row(w.db, w.id)["status"] is src


# -- the transition table ------------------------------------------------------------------

OPERATIONS = (Status.IN_PROGRESS, Status.COMPLETED, Status.FAILED, Status.CANCELLED)
PAIRS = [
    pytest.param(src, dst, id=f"{src.value}->{dst.value}") for src in Status for dst in OPERATIONS
]


def test_table_is_the_documented_one():
    """The documented transitions, pinned: a change of the table shows up here first."""
    allowed = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    assert set(TRANSITIONS) == set(Status)
    assert allowed == {
        (Status.PENDING, Status.IN_PROGRESS),
        (Status.PENDING, Status.CANCELLED),
        (Status.IN_PROGRESS, Status.COMPLETED),
        (Status.IN_PROGRESS, Status.FAILED),
        (Status.IN_PROGRESS, Status.CANCELLED),
        (Status.IN_PROGRESS, Status.PENDING),  # a retry the body asked for
    }
    assert all(not TRANSITIONS[s] for s in Status.terminal())
    # Back to pending only from in_progress: nothing resurrects a finished job.
    assert [s for s, targets in TRANSITIONS.items() if Status.PENDING in targets] == [
        Status.IN_PROGRESS
    ]


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_transition(db, worker, src, dst):
    allowed = dst in TRANSITIONS[src]
    if dst is Status.IN_PROGRESS:
        check_enter(worker, src, allowed)
    elif dst is Status.CANCELLED:
        check_cancel(worker, src, allowed)
    else:
        check_leave(worker, src, dst, allowed)


def check_enter(w: Worker, src: Status, allowed: bool) -> None:
    arrange_at_rest(w, src)
    before = read_row(w.db, w.id)
    if allowed:
        t0 = now()
        cp = w.enter()
        t1 = now()
        assert cp.cancelled is False
        assert [a.job_id for a in w.jobs.active()] == [w.id]
        row = read_row(w.db, w.id)
        assert row["status"] is Status.IN_PROGRESS
        assert_between(row["started_at"], t0, t1)
        assert row["worker_id"] == worker_id()  # its heartbeat is this process's
        assert row["finished_at"] is None
        assert row["cancel_requested_at"] is None
        assert row["cancel_reason"] is None
        assert row["error"] is None
        assert w.leave() is False
        row = read_row(w.db, w.id)
        assert row["status"] is Status.COMPLETED
        assert row["finished_at"] >= row["started_at"]
        return
    if src is Status.CANCELLED:
        # Not a transition: the with statement raises the cancel; the body never runs.
        with pytest.raises(Cancelled) as info:
            w.jobs.run(w.id).__enter__()
        assert (info.value.job_id, info.value.reason) == (w.id, "arranged")
    else:
        with pytest.raises(InvalidTransition) as info:
            w.jobs.run(w.id).__enter__()
        err = info.value
        assert (err.model, err.job_id, err.current, err.wanted) == (
            "Analysis",
            w.id,
            src.value,
            "in_progress",
        )
        message = str(err)
        assert "Analysis" in message
        assert repr(w.id) in message
        assert repr(src.value) in message
        assert "'in_progress'" in message
    assert read_row(w.db, w.id) == before
    assert all(a.checkpoint is w.cp for a in w.jobs.active())


def check_cancel(w: Worker, src: Status, allowed: bool) -> None:
    arrange_at_rest(w, src)
    before = read_row(w.db, w.id)
    t0 = now()
    result = w.jobs.cancel(w.id, reason="by the test")
    t1 = now()
    row = read_row(w.db, w.id)
    if not allowed:
        # Already cancelled: True, the first reason is kept. Completed/failed: False.
        assert result is (src is Status.CANCELLED)
        assert row == before
        return
    assert result is True
    assert row["status"] is Status.CANCELLED
    assert_between(row["cancel_requested_at"], t0, t1)
    assert row["cancel_reason"] == "by the test"
    assert row["error"] is None
    if src is Status.PENDING:
        # Nothing runs it: the job has stopped now.
        assert_between(row["finished_at"], t0, t1)
        assert row["started_at"] is None
        assert w.jobs.wait(w.id, timeout=5) is Status.CANCELLED
        return
    # A running job: its worker has not stopped yet, but sees the cancel at once.
    assert src is Status.IN_PROGRESS
    assert row["finished_at"] is None
    assert row["started_at"] == before["started_at"]
    assert w.cp.cancelled is True
    assert w.cp.reason == "by the test"
    with pytest.raises(Cancelled):
        w.cp()
    assert w.leave() is False
    after = read_row(w.db, w.id)
    assert after["status"] is Status.CANCELLED  # never completed after a cancel
    assert after["finished_at"] is not None
    assert after["finished_at"] >= row["cancel_requested_at"]


def check_leave(w: Worker, src: Status, dst: Status, allowed: bool) -> None:
    arrange_with_open_run(w, src)
    before = read_row(w.db, w.id)
    cp = w.cp
    t0 = now()
    swallowed = w.leave() if dst is Status.COMPLETED else w.leave(RuntimeError(FAILURE))
    t1 = now()
    # Only a Cancelled is ever swallowed: a failure always reaches the caller.
    assert swallowed is False
    row = read_row(w.db, w.id)
    if allowed:
        assert src is Status.IN_PROGRESS
        assert row["status"] is dst
        assert_between(row["finished_at"], t0, t1)
        assert row["finished_at"] >= row["started_at"]
        assert row["error"] == (None if dst is Status.COMPLETED else f"RuntimeError: {FAILURE}")
        assert row["cancel_requested_at"] is None
        assert cp.cancelled is False
        return
    # Refused: the status and every column but finished_at (and cancel_observed_at)
    # stay as they were; finished_at is set now if nobody set it before, because this
    # worker has really stopped, and with it when the worker saw the cancel.
    assert row["status"] is src
    stamps = ("finished_at", "cancel_observed_at")
    assert {k: v for k, v in row.items() if k not in stamps} == {
        k: v for k, v in before.items() if k not in stamps
    }
    if before["finished_at"] is not None:
        assert row["finished_at"] == before["finished_at"]
        assert row["cancel_observed_at"] == before["cancel_observed_at"]
    else:
        assert_between(row["finished_at"], t0, t1)
        if src is Status.CANCELLED:
            assert_between(row["cancel_observed_at"], t0, t1)
            assert row["cancel_observed_at"] <= row["finished_at"]
        else:
            assert row["cancel_observed_at"] is None
    # Cancelled, or taken away by another hand (fenced: a normal exit reads the row
    # and finds out); a worker leaving on its own error has nothing left to stop, nor
    # one that completed its job itself (cp.complete).
    fenced = dst is Status.COMPLETED and src in (Status.PENDING, Status.FAILED)
    assert cp.cancelled is (src is Status.CANCELLED or fenced)
    if cp.cancelled and src is not Status.CANCELLED:
        assert cp.reason == src.value


# -- the same rules through real ``with`` statements ---------------------------------------


def test_with_statement_completes(db):
    jobs = db.jobs()
    job = db.add()
    with jobs.run(job) as cp:
        assert jobs.status(job) is Status.IN_PROGRESS
        cp()
    row = read_row(db, job)
    assert row["status"] is Status.COMPLETED
    assert row["finished_at"] is not None
    assert jobs.wait(job, timeout=5) is Status.COMPLETED


def test_with_statement_fails_and_reraises(db):
    jobs = db.jobs()
    job = db.add()
    error = ValueError("bad file: x.wav")
    with pytest.raises(ValueError) as info:
        _fail_inside(jobs, job, error)
    assert info.value is error
    row = read_row(db, job)
    assert row["status"] is Status.FAILED
    assert row["error"] == "ValueError: bad file: x.wav"
    assert row["finished_at"] is not None
    assert jobs.wait(job, timeout=5) is Status.FAILED


def _fail_inside(jobs: Jobs, job: int, error: BaseException) -> None:
    with jobs.run(job):
        raise error


def test_cancel_during_run_is_never_completed(db):
    """The worker ignores the checkpoint and returns normally: the job stays cancelled."""
    jobs = db.jobs(interval=3600)
    job = db.add()
    with jobs.run(job) as cp:
        assert jobs.cancel(job, reason="user left") is True
        assert read_row(db, job)["finished_at"] is None
    assert cp.cancelled is True
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["cancel_reason"] == "user left"
    assert row["finished_at"] is not None


def test_cancel_seen_by_poll_is_never_completed(db):
    """The cancel reaches the row behind this process's back (no local flip)."""
    jobs = db.jobs(interval=3600)
    job = db.add()
    with jobs.run(job) as cp:
        with db.engine.begin() as conn:  # what a cancel from another machine leaves
            conn.execute(update(TABLE).where(TABLE.c.id == job).values(status=Status.CANCELLED))
        assert cp.cancelled is False
    assert cp.cancelled is True
    row = read_row(db, job)
    assert row["status"] is Status.CANCELLED
    assert row["finished_at"] is not None


def test_every_exit_sets_finished_at(db):
    jobs = db.jobs()
    normal, failing, cancelled, self_cancelled = (db.add() for _ in range(4))
    with jobs.run(normal):
        pass
    with pytest.raises(KeyError):
        _fail_inside(jobs, failing, KeyError("k"))
    with jobs.run(cancelled) as cp:
        jobs.cancel(cancelled)
        cp()
    with jobs.run(self_cancelled):
        raise Cancelled(self_cancelled, "worker gave up")
    for job in (normal, failing, cancelled, self_cancelled):
        assert read_row(db, job)["finished_at"] is not None, job
    assert read_row(db, self_cancelled)["status"] is Status.CANCELLED
    assert read_row(db, self_cancelled)["cancel_reason"] == "worker gave up"


def test_second_run_of_a_job_cancelled_while_running_leaves_it_running(db):
    """A second ``run()`` of a job whose worker is still inside must not mark it stopped.

    The job is cancelled while its first worker runs (elsewhere; here: a thread that has
    not polled yet), so ``finished_at`` is still NULL: that worker has not stopped. A
    duplicate delivery of the task enters ``run()``, gets the
    cancel from its ``with`` statement, and never runs its body. That run never started
    the job; if it stamped ``finished_at``, ``wait()`` would report "stopped" while the
    first worker still processes files, and the caller would delete them under it.
    """
    jobs = db.jobs(interval=3600)
    job = db.add()
    inside, release = threading.Event(), threading.Event()

    def first_worker() -> None:
        with jobs.run(job):
            inside.set()
            release.wait(30)  # busy with one long item; no checkpoint call yet

    t = threading.Thread(target=first_worker, daemon=True)
    t.start()
    try:
        assert inside.wait(10)
        assert jobs.cancel(job, reason="session deleted") is True
        before = read_row(db, job)
        assert before["finished_at"] is None
        with pytest.raises(Cancelled), jobs.run(job):
            raise AssertionError("the body of a cancelled job ran")
        assert read_row(db, job) == before, "a run that never started the job stopped it"
        with pytest.raises(TimeoutError):
            jobs.wait(job, timeout=0.2)
    finally:
        release.set()
        t.join(10)
    assert not t.is_alive()
    assert jobs.wait(job, timeout=5) is Status.CANCELLED


# -- the CHECK constraint and the column type ----------------------------------------------

# What the drivers raise for a CHECK violation. PyMySQL maps MariaDB's error 4025
# (ER_CONSTRAINT_FAILED) to OperationalError, not IntegrityError.
CHECK_ERRORS = {
    "sqlite": sqlalchemy.exc.IntegrityError,
    "postgresql": sqlalchemy.exc.IntegrityError,
    "mariadb": sqlalchemy.exc.OperationalError,
}


def test_check_constraint_exists(db):
    names = [c["name"] for c in inspect(db.engine).get_check_constraints("analysis")]
    assert "ck_analysis_status" in names


def test_check_constraint_refuses_unknown_status_on_insert(db):
    with pytest.raises(sqlalchemy.exc.DBAPIError) as info:
        _raw(
            db,
            "INSERT INTO analysis (user_id, session_id, status) VALUES ('u', 's', 'bogus')",
        )
    assert type(info.value) is CHECK_ERRORS[db.name]
    assert "ck_analysis_status" in str(info.value.orig)
    if db.name == "mariadb":
        assert info.value.orig.args[0] == 4025
    with db.engine.connect() as conn:
        assert conn.execute(select(TABLE.c.id)).all() == []


def test_check_constraint_refuses_unknown_status_on_update(db):
    job = db.add()
    before = read_row(db, job)
    with pytest.raises(sqlalchemy.exc.DBAPIError) as info:
        _raw(db, f"UPDATE analysis SET status = 'bogus' WHERE id = {job}")
    assert type(info.value) is CHECK_ERRORS[db.name]
    assert read_row(db, job) == before


def test_check_constraint_accepts_the_five_states(db):
    for status in Status:
        _raw(
            db,
            "INSERT INTO analysis (user_id, session_id, status) "
            f"VALUES ('u', 's', '{status.value}')",
        )
    with db.engine.connect() as conn:
        stored = conn.execute(select(TABLE.c.status)).scalars().all()
    assert sorted(stored) == sorted(Status)
    assert all(type(s) is Status for s in stored)


def _raw(db: Any, sql: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(sql))


def test_status_type_refuses_unknown_values_in_python(db):
    """StatusType raises ValueError before anything reaches the database.

    Through a statement, SQLAlchemy wraps errors raised while binding parameters in
    ``StatementError`` (``.orig`` is the ValueError); called directly it is a ValueError.
    """
    status_type = StatusType()
    with pytest.raises(ValueError, match="'bogus' is not a job status") as info:
        status_type.process_bind_param("bogus", db.engine.dialect)
    for status in Status:
        assert status.value in str(info.value)
    assert status_type.process_bind_param("failed", db.engine.dialect) == "failed"
    assert status_type.process_bind_param(Status.FAILED, db.engine.dialect) == "failed"

    with pytest.raises(sqlalchemy.exc.StatementError) as wrapped:
        db.add(status="bogus")
    assert not isinstance(wrapped.value, sqlalchemy.exc.DBAPIError)
    assert isinstance(wrapped.value.orig, ValueError)
    assert "'bogus' is not a job status" in str(wrapped.value.orig)
    with db.engine.connect() as conn:
        assert conn.execute(select(TABLE.c.id)).all() == []

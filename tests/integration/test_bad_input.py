"""Bad input: the documented error, a message that says what to fix, and nothing changed.

Every case that reaches a job compares the whole table before and after the call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from dbcancel import (
    CancellableMixin,
    Cancelled,
    DbcancelError,
    InvalidTransition,
    JobNotFound,
    Jobs,
    Status,
)
from tests.models import Analysis

TABLE = Analysis.__table__
MISSING = 987654


def table_state(db: Any) -> list[dict[str, Any]]:
    """Every row of the job table, every column."""
    with db.engine.connect() as conn:
        rows = conn.execute(select(TABLE).order_by(TABLE.c.id)).mappings().all()
    return [dict(r) for r in rows]


@pytest.fixture
def populated(db: Any) -> list[int]:
    """A job in every state, owned by alice, plus one pending job of bob's."""
    jobs = db.jobs()
    ids = [db.add() for _ in range(4)]
    pending, running, completed, failed = ids
    with jobs.run(completed):
        pass
    with pytest.raises(RuntimeError), jobs.run(failed):
        raise RuntimeError("arranged failure")
    db_cancelled = db.add()
    jobs.cancel(db_cancelled, reason="arranged")
    with db.sessions.begin() as s:  # running in some other worker
        s.get(Analysis, running).status = Status.IN_PROGRESS
    bob = db.add(user_id="bob", session_id="s9")
    return [pending, running, completed, failed, db_cancelled, bob]


# -- construction (nothing reaches a database: one engine that never connects) -------------


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    ("interval", "error"),
    [
        pytest.param(0, ValueError, id="zero"),
        pytest.param(0.0, ValueError, id="zero-float"),
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(-0.5, ValueError, id="negative-float"),
        pytest.param(math.nan, ValueError, id="nan"),
        pytest.param(math.inf, ValueError, id="inf"),
        pytest.param(-math.inf, ValueError, id="minus-inf"),
        pytest.param(True, TypeError, id="True"),
        pytest.param(False, TypeError, id="False"),
        pytest.param("1", TypeError, id="str"),
        pytest.param(None, TypeError, id="None"),
    ],
)
def test_bad_interval(engine, interval, error):
    with pytest.raises(error, match="interval") as info:
        Jobs(engine, Analysis, interval=interval)
    assert repr(interval) in str(info.value)


def test_good_intervals_are_kept(engine):
    assert Jobs(engine, Analysis, interval=1).interval == 1.0
    assert Jobs(engine, Analysis, interval=0.001).interval == 0.001
    assert Jobs(engine, Analysis).interval == 0.5


def test_clock_must_be_callable(engine):
    with pytest.raises(TypeError, match="clock"):
        Jobs(engine, Analysis, clock=1.0)


@pytest.mark.parametrize(
    "bind",
    [
        pytest.param("sqlite://", id="url-string"),
        pytest.param(None, id="None"),
        pytest.param(object(), id="object"),
        pytest.param(sessionmaker(), id="unbound-sessionmaker"),
    ],
)
def test_bind_must_be_engine_or_sessionmaker(bind):
    with pytest.raises(TypeError, match="Engine") as info:
        Jobs(bind, Analysis)
    if not isinstance(bind, sessionmaker):
        assert type(bind).__name__ in str(info.value)


def test_bind_may_be_a_bound_sessionmaker(db):
    job = db.add()
    jobs = Jobs(db.sessions, Analysis, interval=0.05)
    assert jobs.status(job) is Status.PENDING


def test_connection_is_not_a_bind(engine):
    with engine.connect() as conn, pytest.raises(TypeError, match="Connection"):
        Jobs(conn, Analysis)


class OtherBase(DeclarativeBase):
    pass


class Plain(OtherBase):
    """A job table that never got the mixin."""

    __tablename__ = "plain_job"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16))


class TwoKeys(CancellableMixin, OtherBase):
    __tablename__ = "two_keys"
    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[int] = mapped_column(primary_key=True)


MIXIN_COLUMNS = [
    "cancel_requested_at",
    "cancel_reason",
    "cancel_observed_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "error",
    "worker_id",
]


def test_model_without_the_mixin(engine):
    with pytest.raises(TypeError) as info:
        Jobs(engine, Plain)
    message = str(info.value)
    assert "Plain" in message
    for name in MIXIN_COLUMNS:
        assert name in message
    # "status" exists: the message lists only what is missing.
    assert not re.search(r"\bstatus\b", message.split("that dbcancel needs")[0])
    assert "CancellableMixin" in message


def test_table_without_some_columns(engine):
    table = Table(
        "half_job",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("status", String(16)),
        Column("started_at", String(32)),
        Column("finished_at", String(32)),
    )
    with pytest.raises(TypeError) as info:
        Jobs(engine, table)
    message = str(info.value)
    assert "half_job" in message
    missing = message.split("that dbcancel needs")[0]
    for name in (
        "cancel_requested_at",
        "cancel_reason",
        "cancel_observed_at",
        "heartbeat_at",
        "error",
    ):
        assert name in missing
    for name in ("started_at", "finished_at"):
        assert name not in missing


def test_model_with_two_column_primary_key(engine):
    with pytest.raises(TypeError, match=r"TwoKeys.*single-column primary key"):
        Jobs(engine, TwoKeys)


@pytest.mark.parametrize("model", [pytest.param("analysis", id="str"), pytest.param(42, id="int")])
def test_not_a_model(engine, model):
    with pytest.raises(TypeError, match="mapped model class or a Table"):
        Jobs(engine, model)


def test_table_of_the_model_is_accepted(db):
    job = db.add()
    jobs = Jobs(db.engine, TABLE, interval=0.05)
    assert jobs.model_name == "analysis"
    assert jobs.cancel(job) is True
    assert db.row(job).status is Status.CANCELLED


# -- unknown columns -----------------------------------------------------------------------


def assert_names_column(err: BaseException, column: str) -> None:
    message = str(err)
    assert repr(column) in message
    assert "Analysis" in message
    assert "Nothing was changed" in message


def test_unknown_column_in_cancel_where(db, populated):
    jobs = db.jobs()
    before = table_state(db)
    with pytest.raises(ValueError) as info:
        jobs.cancel(populated[0], where={"owner": "alice"})
    assert_names_column(info.value, "owner")
    assert table_state(db) == before


def test_unknown_column_in_run_where(db, populated):
    jobs = db.jobs()
    before = table_state(db)
    with pytest.raises(ValueError) as info:
        jobs.run(populated[0], where={"user_id": "alice", "tenant": 3})
    assert_names_column(info.value, "tenant")
    assert "'user_id'" not in str(info.value).split(";")[0]
    assert table_state(db) == before
    assert jobs.active() == ()


def test_unknown_column_in_cancel_where_filters(db, populated):
    jobs = db.jobs()
    before = table_state(db)
    with pytest.raises(ValueError) as info:
        jobs.cancel_where(user_id="alice", sesion_id="s1")
    assert_names_column(info.value, "sesion_id")
    assert table_state(db) == before


def test_cancel_where_needs_a_filter(db, populated):
    jobs = db.jobs()
    before = table_state(db)
    with pytest.raises(ValueError, match="at least one column filter") as info:
        jobs.cancel_where()
    assert "Analysis" in str(info.value)
    assert table_state(db) == before


# -- ids -----------------------------------------------------------------------------------


def _call(jobs: Jobs, op: str, job: Any, **kw: Any) -> Any:
    """Call one of the job-addressing operations of ``jobs``."""
    if op == "run":
        with jobs.run(job, **kw) as cp:
            cp()
        return None
    if op == "wait":
        return jobs.wait(job, timeout=5, **kw)
    return getattr(jobs, op)(job, **kw)


OPS = ["cancel", "status", "wait", "run"]


@pytest.mark.parametrize("op", OPS)
def test_unknown_id(db, populated, op):
    jobs = db.jobs()
    before = table_state(db)
    with pytest.raises(JobNotFound) as info:
        _call(jobs, op, MISSING)
    err = info.value
    assert isinstance(err, DbcancelError)
    assert isinstance(err, LookupError)
    assert (err.model, err.job_id) == ("Analysis", MISSING)
    # Only a call that would have changed the row says that nothing was changed.
    changing = op in ("cancel", "run")
    assert err.changing is changing
    tail = "; nothing was changed" if changing else ""
    assert str(err) == f"Analysis {MISSING} not found{tail}"
    assert table_state(db) == before
    assert jobs.active() == ()


@pytest.mark.parametrize("bad", ["abc", "1", 1.0, True, None, b"1"], ids=repr)
def test_id_of_the_wrong_type(db, bad):
    jobs = db.jobs()
    db.add()
    before = table_state(db)
    for op in OPS:
        with pytest.raises(TypeError) as info:
            _call(jobs, op, bad)
        message = str(info.value)
        assert "Analysis" in message, op
        assert repr(bad) in message, op
        assert "int" in message, op
    assert table_state(db) == before
    assert jobs.active() == ()


# -- where= that does not match ------------------------------------------------------------


STATES = ["pending", "in_progress", "completed", "failed", "cancelled"]


@pytest.mark.parametrize("state", range(5), ids=STATES)
def test_cancel_of_another_users_job(db, populated, state):
    """Whatever state alice's job is in, bob can neither change it nor learn it exists."""
    jobs = db.jobs()
    job = populated[state]
    where = {"user_id": "bob"}
    before = table_state(db)
    with pytest.raises(JobNotFound) as mismatch:
        jobs.cancel(job, where=where)
    with pytest.raises(JobNotFound) as missing:
        jobs.cancel(MISSING, where=where)
    assert table_state(db) == before
    # The same message, word for word, but for the id: nothing tells them apart.
    assert str(mismatch.value).replace(repr(job), "<id>") == str(missing.value).replace(
        repr(MISSING), "<id>"
    )
    assert "Analysis" in str(mismatch.value)
    assert repr(job) in str(mismatch.value)
    assert mismatch.value.where == where


def test_run_of_another_users_job(db, populated):
    jobs = db.jobs()
    pending = populated[0]
    before = table_state(db)
    with pytest.raises(JobNotFound) as info:
        _call(jobs, "run", pending, where={"user_id": "bob"})
    assert "Analysis" in str(info.value)
    assert repr(pending) in str(info.value)
    assert table_state(db) == before
    assert jobs.active() == ()


def test_where_that_matches_is_obeyed(db, populated):
    jobs = db.jobs()
    bob = populated[-1]
    assert jobs.cancel(bob, where={"user_id": "bob", "session_id": "s9"}) is True
    assert db.row(bob).status is Status.CANCELLED


def test_mismatched_cancel_does_not_reach_a_local_worker(db):
    jobs = db.jobs(interval=3600)
    job = db.add()
    calls = []
    with jobs.run(job) as cp:
        cp.on_cancel(lambda: calls.append("cancelled"))
        before = table_state(db)
        with pytest.raises(JobNotFound):
            jobs.cancel(job, where={"user_id": "mallory"})
        assert table_state(db) == before
        assert cp.cancelled is False
        assert calls == []
    assert db.row(job).status is Status.COMPLETED


# -- refused transitions -------------------------------------------------------------------


@pytest.mark.parametrize("state", [1, 2, 3], ids=STATES[1:4])
def test_invalid_transition_message(db, populated, state):
    jobs = db.jobs()
    job = populated[state]
    current = db.row(job).status
    before = table_state(db)
    with pytest.raises(InvalidTransition) as info:
        _call(jobs, "run", job)
    err = info.value
    assert isinstance(err, DbcancelError)
    assert (err.model, err.job_id, err.current, err.wanted) == (
        "Analysis",
        job,
        current.value,
        "in_progress",
    )
    if current is Status.IN_PROGRESS:  # the arranged row names no worker
        assert err.worker is None
        assert str(err).startswith(
            f"Analysis {job!r} is already running, so it cannot start again (from "
            "'in_progress' to 'in_progress'); nothing was changed. "
        )
    else:
        assert str(err) == (
            f"Analysis {job!r} cannot go from {current.value!r} to 'in_progress'; "
            "nothing was changed"
        )
    assert table_state(db) == before
    assert jobs.active() == ()


def test_cancel_of_a_finished_job_is_false_not_an_error(db, populated):
    jobs = db.jobs()
    before = table_state(db)
    assert jobs.cancel(populated[2]) is False
    assert jobs.cancel(populated[3]) is False
    assert table_state(db) == before


# -- other arguments -----------------------------------------------------------------------


def test_reason_must_be_a_string(db):
    jobs = db.jobs()
    job = db.add()
    before = table_state(db)
    for reason in (42, b"bytes", ["list"]):
        with pytest.raises(TypeError, match="reason"):
            jobs.cancel(job, reason=reason)
    assert table_state(db) == before


def test_wait_timeout_must_be_a_duration(db):
    jobs = db.jobs()
    job = db.add()
    jobs.cancel(job)
    for timeout in (-1, -0.001, math.nan, True):
        with pytest.raises(ValueError, match="timeout"):
            jobs.wait(job, timeout=timeout)
    assert jobs.wait(job, timeout=0) is Status.CANCELLED


def test_long_reason_is_cut_the_same_everywhere(db):
    """A reason longer than the column is cut to 255 characters, in the row and locally.

    The worker in this process must see the same reason as a worker in another process
    (which reads it from the row) and as ``cp.reason`` after a poll.
    """
    jobs = db.jobs(interval=3600)
    job = db.add()
    reason = "r" * 300
    with jobs.run(job) as cp:
        assert jobs.cancel(job, reason=reason) is True
        stored = db.row(job).cancel_reason
        assert stored == "r" * 255
        assert cp.reason == stored
        with pytest.raises(Cancelled) as info:
            cp()
        assert info.value.reason == stored

"""What a new user meets first: ids that never come back, a missing table said once and
plainly, a refused second run that names the worker running the job.

Every case runs on SQLite, PostgreSQL and MariaDB (the ``database`` fixture's scope).
"""

from __future__ import annotations

import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import MetaData, String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcancel import CancellableMixin, DbcancelError, InvalidTransition, Jobs, Status
from dbcancel.models import WORKER_TABLE
from tests.conftest import Database

OPS = ["status", "cancel", "wait", "run"]


def _call(jobs: Jobs, op: str, job_id: int) -> Any:
    if op == "run":
        with jobs.run(job_id) as cp:
            cp()
        return None
    if op == "wait":
        return jobs.wait(job_id, timeout=5)
    return getattr(jobs, op)(job_id)


# -- ids are never reused -------------------------------------------------------------


def test_the_newest_jobs_id_is_not_given_to_the_next_job(db: Database) -> None:
    jobs = db.jobs()
    first = db.add()
    newest = db.add()
    # cancel, wait, delete: the flow the docs recommend for the newest job
    assert jobs.cancel(newest, reason="user deleted it")
    assert jobs.wait(newest, timeout=5) is Status.CANCELLED
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM analysis WHERE id = :id"), {"id": newest})
    following = db.add()
    assert following > newest > first
    # A late request for the deleted job finds nothing rather than the new one.
    assert jobs.cancel(following) is True
    assert jobs.status(first) is Status.PENDING


def test_a_models_own_table_args_keep_autoincrement_and_may_refuse_it() -> None:
    class Base(DeclarativeBase):
        pass

    class Plain(CancellableMixin, Base):
        __tablename__ = "plain"
        __table_args__: ClassVar[dict[str, Any]] = {"comment": "the model's own"}
        id: Mapped[int] = mapped_column(primary_key=True)

    class Refused(CancellableMixin, Base):
        __tablename__ = "refused"
        __table_args__: ClassVar[dict[str, Any]] = {"sqlite_autoincrement": False}
        id: Mapped[int] = mapped_column(primary_key=True)

    class Keyed(CancellableMixin, Base):  # SQLite allows AUTOINCREMENT on integers only
        __tablename__ = "keyed"
        id: Mapped[str] = mapped_column(String(36), primary_key=True)

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)  # a table SQLite refused would raise here
    with engine.connect() as conn:
        sql = dict(conn.execute(text("SELECT name, sql FROM sqlite_master")).all())
    engine.dispose()
    assert "AUTOINCREMENT" in sql["plain"]
    assert "AUTOINCREMENT" not in sql["refused"]
    assert "AUTOINCREMENT" not in sql["keyed"]


# -- a missing table ------------------------------------------------------------------


@pytest.fixture
def bare(database: Database, tmp_path: Path) -> Iterator[tuple[Database, type[Any], MetaData]]:
    """A job model whose tables do not exist yet, where the suite's worker table is not
    either: a schema of its own on PostgreSQL and MariaDB, a file of its own on SQLite."""
    suffix = uuid.uuid4().hex[:8]
    schema = None if database.name == "sqlite" else f"dbcancel_bare_{suffix}"
    engine = database.engine
    if schema is None:
        engine = create_engine(f"sqlite:///{tmp_path / 'bare.db'}")
    else:
        kind = "SCHEMA" if database.name == "postgresql" else "DATABASE"
        with database.engine.begin() as conn:
            conn.execute(text(f"CREATE {kind} {schema}"))

    class Base(DeclarativeBase):
        pass

    class Job(CancellableMixin, Base):
        __tablename__ = f"bare_job_{suffix}"
        __table_args__: ClassVar[dict[str, Any]] = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True)

    try:
        yield Database(database.name, database.url, engine, database.sessions), Job, Base.metadata
    finally:
        if schema is None:
            engine.dispose()
        else:
            kind = "SCHEMA" if database.name == "postgresql" else "DATABASE"
            cascade = " CASCADE" if database.name == "postgresql" else ""
            with engine.begin() as conn:
                conn.execute(text(f"DROP {kind} {schema}{cascade}"))


def _one_error(call: Any) -> DbcancelError:
    """The error of `call`, checked to be a DbcancelError that chains no other."""
    with pytest.raises(DbcancelError) as info:
        call()
    err = info.value
    assert err.__context__ is None or err.__suppress_context__, traceback.format_exception(err)
    assert err.__cause__ is None
    return err


@pytest.mark.parametrize("op", OPS)
def test_a_missing_job_table_says_which_and_how_to_create_it(bare, op):
    database, job, metadata = bare
    jobs = Jobs(database.engine, job, interval=0.05)  # built while the table is missing
    err = _one_error(lambda: _call(jobs, op, 1))
    message = str(err)
    assert f"the table {job.__tablename__!r} of {job.__name__}" in message
    assert f"and the worker table {WORKER_TABLE!r} do not exist" in message
    assert "metadata.create_all(engine)" in message
    assert message.endswith("nothing was changed")
    # Once created, the same Jobs works: a failed check is made again at the next use.
    metadata.create_all(database.engine)
    assert jobs.active() == ()
    with pytest.raises(LookupError):
        jobs.status(1)


@pytest.mark.parametrize("op", OPS)
def test_a_missing_worker_table_is_one_clear_error_at_the_first_use(bare, op):
    database, job, _ = bare
    job.__table__.create(database.engine)
    with database.engine.begin() as conn:
        conn.execute(job.__table__.insert().values(id=1))
    jobs = Jobs(database.engine, job, interval=0.05)
    err = _one_error(lambda: _call(jobs, op, 1))
    message = str(err)
    assert message.startswith(
        f"the worker table {WORKER_TABLE!r} beside {job.__name__}'s table does not exist"
    )
    assert "op.add_cancellation() or op.upgrade_cancellation()" in message
    with database.engine.connect() as conn:
        status = conn.execute(text(f"SELECT status FROM {job.__table__.fullname}")).scalar_one()
    assert status == "pending"


# -- a job that already runs ----------------------------------------------------------


def test_a_second_run_names_the_worker_running_the_job(db: Database) -> None:
    jobs = db.jobs()
    job = db.add()
    started, release = threading.Event(), threading.Event()

    def worker() -> None:
        with jobs.run(job) as cp:
            started.set()
            release.wait(30)
            cp()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert started.wait(30)
        running = db.row(job)
        assert running is not None
        assert running.worker_id
        with pytest.raises(InvalidTransition) as info, jobs.run(job):
            pass
        err = info.value
        assert (err.current, err.wanted, err.worker) == (
            "in_progress",
            "in_progress",
            running.worker_id,
        )
        assert str(err).startswith(
            f"Analysis {job} is already running in worker {running.worker_id}, so it "
            "cannot start again"
        )
    finally:
        release.set()
        thread.join(30)
    assert jobs.status(job) is Status.COMPLETED

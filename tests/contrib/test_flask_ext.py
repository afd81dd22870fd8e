"""``dbcancel.contrib.flask`` with Flask-SQLAlchemy 3.1 and with a plain engine, on real
SQLite, PostgreSQL and MariaDB databases, driven through Flask's test client and CLI
runner."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app, has_app_context, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import dbcancel
from dbcancel import CancellableMixin, Cancelled, Checkpoint, InvalidTransition, JobNotFound, Status
from dbcancel.cli import main as dbcancel_main
from dbcancel.contrib.flask import DBCancel, DBCancelState
from tests.conftest import Database
from tests.models import Analysis, Result

TIMEOUT = 15


class Base(DeclarativeBase):
    pass


fdb = SQLAlchemy(model_class=Base)


class FlaskJob(CancellableMixin, fdb.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "flask_ext_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), default="alice")


def create_app(database: Database, ext: DBCancel) -> Flask:
    """The app factory of a host app: Flask-SQLAlchemy first, then dbcancel."""
    app = Flask(__name__)
    app.config["TESTING"] = True
    app.config["SQLALCHEMY_DATABASE_URI"] = database.url
    if database.name == "sqlite":
        # Threads of one test write to the same file.
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"connect_args": {"timeout": 30}}
    fdb.init_app(app)
    ext.init_app(app)
    app.extensions["test_threads"] = {}

    @app.post("/jobs/<int:job_id>/cancel")
    def cancel(job_id: int) -> Any:
        body = request.get_json(silent=True) or {}
        cancelled = ext.jobs.cancel(job_id, reason=body.get("reason"))
        return jsonify(cancelled=cancelled)

    return app


def dispose(app: Flask) -> None:
    with app.app_context():
        for engine in fdb.engines.values():
            engine.dispose()


@pytest.fixture
def ext() -> DBCancel:
    return DBCancel(db=fdb, model=FlaskJob, interval=0.05)


@pytest.fixture
def app(db: Database, ext: DBCancel) -> Iterator[Flask]:
    app = create_app(db, ext)
    with app.app_context():
        fdb.create_all()
    yield app
    with app.app_context():
        fdb.session.execute(FlaskJob.__table__.delete())
        fdb.session.commit()
    dispose(app)


def add_job(app: Flask, **values: Any) -> int:
    with app.app_context():
        job = FlaskJob(**values)
        fdb.session.add(job)
        fdb.session.commit()
        return job.id


def loop_until_cancelled(
    cp: Checkpoint, job_id: int, started: threading.Event, seen: dict[str, Any]
) -> None:
    """A worker: record where it runs, then call the checkpoint until it raises."""
    seen["app"] = current_app._get_current_object()  # type: ignore[attr-defined]
    seen["current"] = dbcancel.current()
    seen["thread"] = threading.current_thread()
    seen["status"] = current_app.extensions["dbcancel"].jobs.status(cp.job_id)
    wake = threading.Event()
    cp.on_cancel(wake.set)
    started.set()
    while True:
        cp()
        wake.wait(0.01)  # pacing only: a cancel sets it and the next cp() raises


# -- setting up -------------------------------------------------------------------------


def test_init_app_in_an_app_factory(db: Database, ext: DBCancel) -> None:
    first, second = create_app(db, ext), create_app(db, ext)
    try:
        state = first.extensions["dbcancel"]
        assert isinstance(state, DBCancelState)
        assert state.extension is ext
        assert state.app is first
        assert "dbcancel" in first.cli.commands

        with pytest.raises(RuntimeError, match="needs an application context"):
            ext.jobs  # noqa: B018
        with pytest.raises(RuntimeError, match="needs an application context"):
            ext.submit(1, loop_until_cancelled)

        with first.app_context():
            jobs = ext.jobs
            assert isinstance(jobs, dbcancel.Jobs)
            assert ext.jobs is jobs is state.jobs
            assert state.engine is fdb.engine
            assert jobs.interval == 0.05
        with second.app_context():
            assert ext.jobs is not jobs
            assert ext.jobs is second.extensions["dbcancel"].jobs

        with pytest.raises(RuntimeError, match="already has a dbcancel extension"):
            ext.init_app(first)
        other = DBCancel(db=fdb, model=FlaskJob)
        with first.app_context(), pytest.raises(RuntimeError, match="not registered on app"):
            other.jobs  # noqa: B018
    finally:
        dispose(first)
        dispose(second)


def test_an_app_given_to_the_constructor_works_outside_its_context(db: Database) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = db.url
    fdb.init_app(app)
    ext = DBCancel(app, db=fdb, model=FlaskJob)
    try:
        assert not has_app_context()
        assert ext.jobs is app.extensions["dbcancel"].jobs
        assert ext.jobs.model_name == "FlaskJob"
    finally:
        dispose(app)


def test_bad_arguments_say_what_to_fix() -> None:
    with pytest.raises(TypeError, match="exactly one of db="):
        DBCancel(model=FlaskJob)
    with pytest.raises(TypeError, match="exactly one of db="):
        DBCancel(db=fdb, engine=object(), model=FlaskJob)
    with pytest.raises(TypeError, match="Flask-SQLAlchemy SQLAlchemy instance"):
        DBCancel(db=object(), model=FlaskJob)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lacks the column"):
        DBCancel(db=fdb, model=Result)
    with pytest.raises(ValueError, match="interval"):
        DBCancel(db=fdb, model=FlaskJob, interval=0)
    with pytest.raises(ValueError, match="real time"):
        DBCancel(db=fdb, model=FlaskJob, watch=True, clock=lambda: 0.0)
    with pytest.raises(ValueError, match="max_staleness"):
        DBCancel(db=fdb, model=FlaskJob, max_staleness=-1)


# -- submit -----------------------------------------------------------------------------


def test_submit_runs_in_the_app_context_and_a_request_cancels_it(app: Flask, ext: DBCancel) -> None:
    job_id = add_job(app)
    started, seen = threading.Event(), {}

    @app.post("/jobs/<int:job_id>/start")
    def start(job_id: int) -> Any:
        thread = ext.submit(job_id, loop_until_cancelled, started, seen=seen)
        app.extensions["test_threads"][job_id] = thread
        return jsonify(started=thread.name), 202

    client = app.test_client()
    response = client.post(f"/jobs/{job_id}/start")
    assert response.status_code == 202
    assert response.json == {"started": f"dbcancel-job-{job_id}"}
    thread = app.extensions["test_threads"][job_id]
    assert thread.daemon
    assert started.wait(TIMEOUT)

    assert seen["app"] is app
    assert seen["thread"] is thread
    assert isinstance(seen["current"], Checkpoint)
    assert seen["current"].job_id == job_id
    assert seen["status"] is Status.IN_PROGRESS
    with app.app_context():
        active = ext.jobs.active()
        assert [(a.job_id, a.thread) for a in active] == [(job_id, thread)]

    response = client.post(f"/jobs/{job_id}/cancel", json={"reason": "session deleted"})
    assert response.json == {"cancelled": True}
    with app.app_context():
        assert ext.jobs.wait(job_id, timeout=TIMEOUT) is Status.CANCELLED
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert ext.jobs.active() == ()
        row = fdb.session.get(FlaskJob, job_id)
        assert row is not None
        assert row.cancel_reason == "session deleted"
        assert row.finished_at is not None


def test_exceptions_mark_the_job_failed_and_are_logged(
    app: Flask, ext: DBCancel, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = add_job(app)

    def boom(cp: Checkpoint, job_id: int) -> None:
        cp()
        raise ValueError("boom")

    with app.app_context():
        with caplog.at_level(logging.ERROR):
            ext.submit(job_id, boom).join(TIMEOUT)
        assert ext.jobs.wait(job_id, timeout=TIMEOUT) is Status.FAILED
        row = fdb.session.get(FlaskJob, job_id)
        assert row is not None
        assert row.error == "ValueError: boom"
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failed
    assert f"FlaskJob {job_id} failed" in failed[0].getMessage()
    assert failed[0].exc_info is not None
    assert failed[0].exc_info[0] is ValueError


def test_submit_checks_the_job_before_starting_a_thread(app: Flask, ext: DBCancel) -> None:
    done = add_job(app, status=Status.COMPLETED)
    cancelled = add_job(app)
    calls: list[int] = []

    def record(cp: Checkpoint, job_id: int) -> None:
        calls.append(job_id)

    with app.app_context():
        with pytest.raises(JobNotFound, match="FlaskJob 999999 not found"):
            ext.submit(999999, record)
        with pytest.raises(InvalidTransition, match="from 'completed' to 'in_progress'"):
            ext.submit(done, record)
        with pytest.raises(TypeError, match="ids are int"):
            ext.submit(str(done), record)
        assert not [t for t in threading.enumerate() if t.name.startswith("dbcancel-job-")]

        # Cancelled before its thread got to it: fn is never called.
        assert ext.jobs.cancel(cancelled) is True
        ext.submit(cancelled, record).join(TIMEOUT)
        assert calls == []
        assert ext.jobs.status(cancelled) is Status.CANCELLED


def test_coroutine_functions_run_with_asyncio(app: Flask, ext: DBCancel) -> None:
    job_id = add_job(app)
    seen: list[object] = []

    async def work(cp: Checkpoint, job_id: int, label: str) -> None:
        await asyncio.sleep(0)
        cp()
        seen.append((label, job_id, dbcancel.current() is cp, has_app_context()))

    with app.app_context():
        ext.submit(job_id, work, "async").join(TIMEOUT)
        assert ext.jobs.status(job_id) is Status.COMPLETED
    assert seen == [("async", job_id, True, True)]


def test_the_session_is_removed_before_the_job_ends(app: Flask, ext: DBCancel) -> None:
    job_id = add_job(app, user_id="alice")

    def touch_row_without_commit(cp: Checkpoint, job_id: int) -> None:
        # Holds a row lock (PostgreSQL, MariaDB) or the write lock (SQLite) until the
        # session goes: the status UPDATE of run()'s exit would wait for it forever.
        fdb.session.execute(
            update(FlaskJob).where(FlaskJob.id == cp.job_id).values(user_id="mallory")
        )
        assert fdb.engine.pool.checkedout() >= 1

    with app.app_context():
        engine = fdb.engine
        ext.submit(job_id, touch_row_without_commit).join(TIMEOUT)
        assert ext.jobs.wait(job_id, timeout=TIMEOUT) is Status.COMPLETED
        assert engine.pool.checkedout() == 0
        user = fdb.session.execute(select(FlaskJob.user_id).where(FlaskJob.id == job_id))
        assert user.scalar_one() == "alice"  # rolled back, never committed


# -- flask dbcancel ---------------------------------------------------------------------


def test_cli_commands(app: Flask, ext: DBCancel, db: Database, capsys: Any) -> None:
    runner = app.test_cli_runner()
    table = FlaskJob.__tablename__

    result = runner.invoke(args=["dbcancel", "list"])
    assert result.exit_code == 0
    assert result.output == f"no pending or in_progress jobs in {table}\n"

    pending = add_job(app)
    running = add_job(app)
    done = add_job(app, status=Status.COMPLETED)
    with app.app_context():
        started = threading.Event()
        thread = ext.submit(running, loop_until_cancelled, started, {})
        assert started.wait(TIMEOUT)

    result = runner.invoke(args=["dbcancel", "list"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["id", "status", "started", "finished", "worker", "reason/error"]
    assert [line.split()[:2] for line in lines[2:]] == [
        [str(pending), "pending"],
        [str(running), "in_progress"],
    ]

    # The same output as python -m dbcancel.
    for args in (["list", "--all"], ["list", "--status", "completed"], ["status", str(done)]):
        result = runner.invoke(args=["dbcancel", *args])
        assert result.exit_code == 0
        assert dbcancel_main([*args, "--url", db.url, "--table", table]) == 0
        assert result.output == capsys.readouterr().out

    result = runner.invoke(args=["dbcancel", "status", str(pending)], prog_name="flask")
    assert (result.exit_code, result.output) == (0, f"{table} {pending}: pending\n")
    result = runner.invoke(args=["dbcancel", "status", "999999"], prog_name="flask")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"flask dbcancel: error: {table} 999999 not found\n"
    result = runner.invoke(args=["dbcancel", "status", "seven"], prog_name="flask")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"flask dbcancel: error: {table} ids are integers; 'seven' is not one\n"
    )

    result = runner.invoke(args=["dbcancel", "cancel", str(pending), "--reason", "by hand"])
    assert (result.exit_code, result.output) == (0, f"{table} {pending}: cancelled\n")
    result = runner.invoke(args=["dbcancel", "cancel", str(pending)])
    assert (result.exit_code, result.output) == (0, f"{table} {pending}: already cancelled\n")
    result = runner.invoke(args=["dbcancel", "cancel", str(running)])
    assert result.exit_code == 0
    assert "cancelled (it was in progress: its worker stops at its next checkpoint)" in (
        result.output
    )
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    result = runner.invoke(args=["dbcancel", "cancel", str(done)])
    assert (result.exit_code, result.output) == (
        1,
        f"{table} {done}: not cancelled: it is completed\n",
    )
    with app.app_context():
        assert ext.jobs.status(pending) is Status.CANCELLED
        row = fdb.session.get(FlaskJob, pending)
        assert row is not None
        assert row.cancel_reason == "by hand"

    result = runner.invoke(args=["dbcancel", "list", "--all", "--status", "pending"])
    assert result.exit_code == 2


def stale(app: Flask, job_id: int, *, seconds: float, **values: Any) -> None:
    """Give the job a heartbeat ``seconds`` old (and ``values``), as a dead worker leaves it."""
    beat = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with app.app_context():
        fdb.session.execute(
            update(FlaskJob)
            .where(FlaskJob.id == job_id)
            .values(started_at=beat, heartbeat_at=beat, **values)
        )
        fdb.session.commit()


def snapshot(app: Flask) -> list[Any]:
    """Every job row, to show that a refused command changed nothing."""
    with app.app_context():
        return list(fdb.session.execute(select(FlaskJob.__table__).order_by(FlaskJob.id)).all())


def test_cli_reap(app: Flask, db: Database, capsys: Any) -> None:
    runner = app.test_cli_runner()
    table = FlaskJob.__tablename__
    lost = add_job(app)
    stale(app, lost, seconds=3600, status=Status.IN_PROGRESS)
    unstopped = add_job(app)
    stale(app, unstopped, seconds=3600, status=Status.CANCELLED, cancel_reason="user left")
    alive = add_job(app)
    stale(app, alive, seconds=5, status=Status.IN_PROGRESS)

    before = snapshot(app)
    for args, message in (
        ([], "Missing option '--stale-after'"),
        (["--stale-after", "0"], "expected a number of seconds > 0, got 0"),
        (["--stale-after", "-1"], "expected a number of seconds > 0, got -1"),
        (["--stale-after", "inf"], "expected a number of seconds > 0, got inf"),
        (["--stale-after", "soon"], "expected a number of seconds, got 'soon'"),
    ):
        result = runner.invoke(args=["dbcancel", "reap", *args])
        assert result.exit_code == 2, args
        assert message in result.output
        assert snapshot(app) == before

    result = runner.invoke(args=["dbcancel", "reap", "--stale-after", "30"])
    assert (result.exit_code, result.output) == (
        0,
        f"reaped 2 jobs of {table} (no heartbeat for 30s)\n",
    )
    with app.app_context():
        failed = fdb.session.get(FlaskJob, lost)
        assert failed is not None
        assert (failed.status, failed.error) == (Status.FAILED, "worker lost")
        assert failed.finished_at is not None
        cancelled = fdb.session.get(FlaskJob, unstopped)
        assert cancelled is not None
        assert (cancelled.status, cancelled.error) == (Status.CANCELLED, None)
        assert cancelled.cancel_reason == "user left"
        assert cancelled.finished_at is not None
    assert [r for r in snapshot(app) if r.id == alive] == [r for r in before if r.id == alive]

    result = runner.invoke(args=["dbcancel", "reap", "--stale-after", "2.5"])
    assert (result.exit_code, result.output) == (
        0,
        f"reaped 1 job of {table} (no heartbeat for 2.5s)\n",
    )
    # The same output as python -m dbcancel.
    result = runner.invoke(args=["dbcancel", "reap", "--stale-after", "2.5"])
    assert result.exit_code == 0
    assert result.output == f"reaped 0 jobs of {table} (no heartbeat for 2.5s)\n"
    assert dbcancel_main(["reap", "--stale-after", "2.5", "--url", db.url, "--table", table]) == 0
    assert result.output == capsys.readouterr().out


# -- a plain engine ---------------------------------------------------------------------


def test_a_plain_engine_or_sessionmaker(db: Database) -> None:
    app = Flask(__name__)
    ext = DBCancel(app, engine=db.sessions, model=Analysis, interval=0.05)
    assert ext.engine is db.engine
    job_id = db.add()
    started, seen = threading.Event(), {}
    thread = ext.submit(job_id, loop_until_cancelled, started, seen)
    assert started.wait(TIMEOUT)
    assert seen["app"] is app
    assert ext.jobs.cancel(job_id) is True
    assert ext.jobs.wait(job_id, timeout=TIMEOUT) is Status.CANCELLED
    thread.join(TIMEOUT)
    assert not thread.is_alive()

    result = app.test_cli_runner().invoke(args=["dbcancel", "status", str(job_id)])
    assert result.exit_code == 0
    assert result.output.startswith(f"analysis {job_id}: cancelled\n")

    # Without the app in the constructor, only inside a context.
    factory = DBCancel(engine=db.engine, model=Analysis)
    other = Flask(__name__)
    factory.init_app(other)
    with pytest.raises(RuntimeError, match="needs an application context"):
        factory.jobs  # noqa: B018
    with other.app_context():
        assert factory.jobs.status(job_id) is Status.CANCELLED


def test_watch_and_max_staleness_reach_the_jobs(db: Database) -> None:
    app = Flask(__name__)
    ext = DBCancel(app, engine=db.engine, model=Analysis, watch=True, max_staleness=30)
    assert (ext.jobs.watch, ext.jobs.max_staleness) == (True, 30.0)
    job_id = db.add()
    started, seen = threading.Event(), {}
    thread = ext.submit(job_id, loop_until_cancelled, started, seen)
    assert started.wait(TIMEOUT)
    assert ext.jobs.stats().watching
    assert ext.jobs.cancel(job_id) is True
    assert ext.jobs.wait(job_id, timeout=TIMEOUT) is Status.CANCELLED
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def test_cancelled_is_swallowed_by_the_thread(db: Database) -> None:
    """A worker that raises Cancelled itself ends cancelled, with nothing logged as error."""
    app = Flask(__name__)
    ext = DBCancel(app, engine=db.engine, model=Analysis)
    job_id = db.add()

    def give_up(cp: Checkpoint, job_id: int) -> None:
        raise Cancelled(cp.job_id, "gave up")

    ext.submit(job_id, give_up).join(TIMEOUT)
    assert ext.jobs.status(job_id) is Status.CANCELLED


def test_importing_without_flask_names_the_extra() -> None:
    script = "import sys; sys.modules['flask'] = None; import dbcancel.contrib.flask"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "pip install 'dbcancel[flask]'" in proc.stderr

"""The command line (``python -m dbcancel``) and the demo, end to end on every database."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import inspect, select, update

from dbcancel import Status
from dbcancel.cli import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, main
from dbcancel.demo import DemoRow, run_demo
from tests.models import Analysis

# One row per job of the demo's final table: job, session, status, frames done/total.
TABLE_ROW = re.compile(r"^\s*(\d+)\s+(s\d+)( \(deleted\))?\s+(\w+)\s+(\d+)/(\d+)\s+.*$", re.M)


def snapshot(db):
    """Every job row, to show that a refused command changed nothing."""
    with db.engine.connect() as conn:
        return conn.execute(select(Analysis.__table__).order_by(Analysis.id)).all()


def run(db, capsys, *args):
    """``main(args)`` against the test database's ``analysis`` table: (code, out, err)."""
    code = main([*args, "--url", db.url, "--table", "analysis"])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text):
    assert text.count("\n") == 1, text
    assert text.endswith("\n"), text
    return text.strip()


# -- the demo ---------------------------------------------------------------------------


def test_demo_command_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBCANCEL_")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dbcancel", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 30
    assert proc.stderr == ""
    # A pipe is not a terminal: plain lines only, no cursor movement in a log.
    assert "\x1b" not in proc.stdout
    assert "\r" not in proc.stdout
    rows = TABLE_ROW.findall(proc.stdout)
    assert len(rows) == 4, proc.stdout
    statuses = [r[3] for r in rows]
    assert statuses.count("cancelled") == 1
    assert statuses.count("completed") == 3
    for _job, _session, deleted, status, done, total in rows:
        assert (status == "cancelled") == bool(deleted)
        if status == "completed":
            assert done == total
        else:
            assert int(done) < int(total)
    assert "read no frame after it" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_run_demo_on_each_database(db):
    mine = db.add(session_id="not-the-demo's")
    before = snapshot(db)
    out = io.StringIO()

    rows = run_demo(db.url, jobs=3, files=3, frame_delay=0.01, out=out)

    assert [type(r) for r in rows] == [DemoRow] * 3
    deleted = [r for r in rows if r.deleted]
    assert len(deleted) == 1
    victim = deleted[0]
    assert victim.status is Status.CANCELLED
    assert victim.frames < victim.total_frames
    assert victim.cancel_latency_ms is not None
    assert victim.cancel_latency_ms >= 0
    assert victim.touches_after_delete == 0
    for r in rows:
        if r is not victim:
            assert r.status is Status.COMPLETED
            assert (r.frames, r.files_opened) == (r.total_frames, r.total_files)
            assert r.cancel_latency_ms is None
    text = out.getvalue()
    assert "\x1b" not in text
    assert len(TABLE_ROW.findall(text)) == 3
    # The demo's own tables are gone; the app's table and rows were never touched.
    names = inspect(db.engine).get_table_names()
    assert not [n for n in names if n.startswith("dbcancel_demo_")]
    assert snapshot(db) == before
    assert db.row(mine).status is Status.PENDING


def test_run_demo_refuses_bad_arguments():
    with pytest.raises(ValueError, match="at least one job"):
        run_demo(jobs=0, out=io.StringIO())
    with pytest.raises(ValueError, match="interval"):
        run_demo(interval=0, out=io.StringIO())
    with pytest.raises(ValueError, match="in-memory"):
        run_demo("sqlite://", out=io.StringIO())


# -- cancel -----------------------------------------------------------------------------


def test_cancel_a_pending_job(db, capsys):
    job = db.add()

    code, out, err = run(db, capsys, "cancel", str(job), "--reason", "session deleted")

    assert code == EXIT_OK
    assert one_line(out) == f"analysis {job}: cancelled"
    assert err == ""
    row = db.row(job)
    assert row.status is Status.CANCELLED
    assert row.cancel_reason == "session deleted"
    assert row.cancel_requested_at is not None
    assert row.finished_at is not None


def test_cancel_twice_says_already_cancelled(db, capsys):
    job = db.add()
    assert run(db, capsys, "cancel", str(job))[0] == EXIT_OK

    code, out, _ = run(db, capsys, "cancel", str(job))

    assert code == EXIT_OK
    assert one_line(out) == f"analysis {job}: already cancelled"


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED])
def test_cancel_a_finished_job_is_refused(db, capsys, status):
    job = db.add(status=status)
    before = snapshot(db)

    code, out, err = run(db, capsys, "cancel", str(job))

    assert code == EXIT_REFUSED
    assert one_line(out) == f"analysis {job}: not cancelled: it is {status.value}"
    assert err == ""
    assert snapshot(db) == before


def test_cancel_a_running_job_stops_its_worker(db, capsys):
    jobs = db.jobs()
    job = db.add()
    started = threading.Event()

    def worker():
        with jobs.run(job) as cp:
            started.set()
            while True:
                cp()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert started.wait(10)
        code, out, _ = run(db, capsys, "cancel", str(job), "--reason", "from the shell")
        assert code == EXIT_OK
        assert one_line(out).startswith(f"analysis {job}: cancelled (it was in progress")
        assert jobs.wait(job, timeout=10) is Status.CANCELLED
    finally:
        jobs.cancel(job)
        thread.join(10)
    assert db.row(job).cancel_reason == "from the shell"


# -- status and list --------------------------------------------------------------------


def test_status_names_the_job_and_its_times(db, capsys):
    job = db.add()
    assert run(db, capsys, "status", str(job)) == (EXIT_OK, f"analysis {job}: pending\n", "")
    db.jobs().cancel(job, reason="user left")

    code, out, err = run(db, capsys, "status", str(job))

    assert (code, err) == (EXIT_OK, "")
    lines = out.splitlines()
    assert lines[:2] == [f"analysis {job}: cancelled", "  reason:    user left"]
    assert re.fullmatch(r"  finished:  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[2])
    assert len(lines) == 3


def test_list(db, capsys):
    pending = db.add()
    running = db.add(status=Status.IN_PROGRESS)
    done = db.add(status=Status.COMPLETED)
    cancelled = db.add()
    db.jobs().cancel(cancelled, reason="session   deleted\nby user")

    def listed(*args):
        code, out, err = run(db, capsys, "list", *args)
        assert (code, err) == (EXIT_OK, "")
        lines = out.splitlines()
        assert lines[0].split() == [
            "id",
            "status",
            "started",
            "finished",
            "worker",
            "reason/error",
        ]
        return {int(line.split()[0]): line for line in lines[2:]}

    rows = listed()
    assert sorted(rows) == [pending, running]
    assert rows[pending].split()[1:] == ["pending", "-", "-", "-", "-"]
    everything = listed("--all")
    assert sorted(everything) == sorted([pending, running, done, cancelled])
    assert everything[cancelled].endswith("session deleted by user")
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", everything[cancelled])
    assert sorted(listed("--status", "completed")) == [done]

    code, out, _ = run(db, capsys, "list", "--status", "failed")
    assert (code, out) == (EXIT_OK, "no failed jobs in analysis\n")


def test_url_and_table_default_to_the_environment(db, capsys, monkeypatch):
    job = db.add()
    monkeypatch.setenv("DBCANCEL_URL", db.url)
    monkeypatch.setenv("DBCANCEL_TABLE", "analysis")

    assert main(["status", str(job)]) == EXIT_OK
    assert capsys.readouterr().out == f"analysis {job}: pending\n"


# -- reap -------------------------------------------------------------------------------


def stale(db, job, *, seconds, **values):
    """Give ``job`` a heartbeat ``seconds`` old (and ``values``), as a dead worker leaves it."""
    beat = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with db.engine.begin() as conn:
        conn.execute(
            update(Analysis.__table__)
            .where(Analysis.id == job)
            .values(started_at=beat, heartbeat_at=beat, **values)
        )


def test_reap_stops_the_jobs_of_dead_workers(db, capsys):
    lost = db.add()
    stale(db, lost, seconds=3600, status=Status.IN_PROGRESS)
    unstopped = db.add()
    stale(db, unstopped, seconds=3600, status=Status.CANCELLED, cancel_reason="user left")
    alive = db.add()
    stale(db, alive, seconds=5, status=Status.IN_PROGRESS)
    pending = db.add()
    done = db.add()
    stale(db, done, seconds=3600, status=Status.COMPLETED, finished_at=dt.datetime.now(dt.UTC))
    untouched = {job: db.row(job) for job in (alive, pending, done)}

    code, out, err = run(db, capsys, "reap", "--stale-after", "30")

    assert (code, err) == (EXIT_OK, "")
    assert one_line(out) == "reaped 2 jobs of analysis (no heartbeat for 30s)"
    failed = db.row(lost)
    assert (failed.status, failed.error) == (Status.FAILED, "worker lost")
    assert failed.finished_at is not None
    cancelled = db.row(unstopped)
    assert (cancelled.status, cancelled.error) == (Status.CANCELLED, None)
    assert cancelled.cancel_reason == "user left"
    assert cancelled.finished_at is not None
    for job, before in untouched.items():
        after = db.row(job)
        assert (after.status, after.error, after.finished_at) == (
            before.status,
            before.error,
            before.finished_at,
        )
    # wait() no longer waits for the dead workers.
    jobs = db.jobs()
    assert jobs.wait(lost, timeout=1) is Status.FAILED
    assert jobs.wait(unstopped, timeout=1) is Status.CANCELLED

    code, out, _ = run(db, capsys, "reap", "--stale-after", "30")
    assert (code, one_line(out)) == (EXIT_OK, "reaped 0 jobs of analysis (no heartbeat for 30s)")


def test_reap_one_job_with_a_fractional_threshold(db, capsys):
    job = db.add()
    stale(db, job, seconds=60, status=Status.IN_PROGRESS)

    code, out, _ = run(db, capsys, "reap", "--stale-after", "2.5")

    assert (code, one_line(out)) == (EXIT_OK, "reaped 1 job of analysis (no heartbeat for 2.5s)")
    assert db.row(job).status is Status.FAILED


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: --stale-after"),
        (["--stale-after", "0"], "expected a number of seconds > 0, got 0"),
        (["--stale-after", "soon"], "expected a number of seconds, got 'soon'"),
    ],
)
def test_reap_needs_a_positive_stale_after(db, capsys, args, message):
    job = db.add()
    stale(db, job, seconds=3600, status=Status.IN_PROGRESS)
    before = snapshot(db)

    code, out, err = run(db, capsys, "reap", *args)

    assert (code, out) == (EXIT_ERROR, "")
    assert message in err
    assert snapshot(db) == before


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["cancel", "status"])
def test_unknown_id_is_one_line_and_changes_nothing(db, capsys, command):
    db.add()
    before = snapshot(db)

    code, out, err = run(db, capsys, command, "987654")

    assert code == EXIT_ERROR
    assert out == ""
    line = one_line(err)
    assert line.startswith("dbcancel: error: analysis 987654 not found")
    # Only a command that could have changed something says that nothing was.
    assert ("nothing was changed" in line) == (command == "cancel")
    assert snapshot(db) == before


def test_id_of_the_wrong_type_is_a_usage_error(db, capsys):
    code, out, err = run(db, capsys, "cancel", "abc")
    assert code == EXIT_ERROR
    assert out == ""
    assert "analysis ids are integers; 'abc' is not one" in err


def test_unknown_table(db, capsys):
    code = main(["list", "--url", db.url, "--table", "no_such_table"])
    out, err = capsys.readouterr()
    assert code == EXIT_ERROR
    assert out == ""
    line = one_line(err)
    assert "no table 'no_such_table'" in line
    assert "analysis" in line


def test_table_without_the_columns(db, capsys):
    code = main(["status", "1", "--url", db.url, "--table", "analysis_result"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "analysis_result lacks the column(s) status" in one_line(err)


@pytest.mark.parametrize(
    ("driver", "url"),
    [
        ("psycopg", "postgresql+psycopg://bob:hunter22@127.0.0.1:1/jobs"),
        ("pymysql", "mysql+pymysql://bob:hunter22@127.0.0.1:1/jobs"),
    ],
)
def test_unreachable_database_is_one_line_without_the_password(capsys, driver, url):
    pytest.importorskip(driver)
    code = main(["cancel", "1", "--url", url, "--table", "analysis"])
    out, err = capsys.readouterr()
    assert code == EXIT_ERROR
    assert out == ""
    line = one_line(err)
    assert line.startswith("dbcancel: error: cannot connect to ")
    assert "bob:***@127.0.0.1:1" in line
    assert "hunter22" not in out + err


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        (
            "postgresql+pg8000://bob:hunter22@127.0.0.1/jobs",
            "driver pg8000 is not installed; pip install pg8000",
        ),
        (
            "postgresql+psycopg2://bob:hunter22@127.0.0.1/jobs",
            "driver psycopg2 is not installed; "
            "pip install psycopg2-binary, or use postgresql+psycopg:// with "
            "pip install 'dbcancel[postgres]'",
        ),
        (
            "mysql+mysqlconnector://bob:hunter22@127.0.0.1/jobs",
            "driver mysql is not installed; pip install mysql-connector-python",
        ),
    ],
)
def test_a_missing_driver_names_what_to_install(capsys, url, fix):
    for absent in ("pg8000", "psycopg2", "mysql.connector"):
        try:
            __import__(absent)
        except ImportError:
            continue
        pytest.fail(f"this test needs {absent} not to be installed")
    code = main(["status", "1", "--url", url, "--table", "analysis"])
    out, err = capsys.readouterr()
    assert (code, out) == (EXIT_ERROR, "")
    line = one_line(err)
    assert line.startswith("dbcancel: error: cannot use ")
    assert "bob:***@127.0.0.1" in line
    assert line.endswith(fix)
    assert "hunter22" not in line


@pytest.mark.parametrize(
    ("module", "url", "extra"),
    [
        ("psycopg", "postgresql+psycopg://bob:hunter22@127.0.0.1/jobs", "postgres"),
        ("pymysql", "mysql+pymysql://bob:hunter22@127.0.0.1/jobs", "mysql"),
    ],
)
@pytest.mark.parametrize("command", [["status", "1"], ["demo"]])
def test_a_missing_known_driver_names_the_extra(capsys, monkeypatch, module, url, extra, command):
    # The driver is installed here: make its import fail as it would without it.
    monkeypatch.setitem(sys.modules, module, None)
    code = main(
        [*command, "--url", url] + (["--table", "analysis"] if command[0] != "demo" else [])
    )
    out, err = capsys.readouterr()
    assert (code, out) == (EXIT_ERROR, "")
    line = one_line(err)
    assert line.endswith(
        f"its database driver {module} is not installed; pip install 'dbcancel[{extra}]'"
    )
    assert "hunter22" not in line


def test_an_unknown_driver_name(capsys):
    code = main(["list", "--url", "postgresql+nosuch://bob:hunter22@h/db", "--table", "t"])
    out, err = capsys.readouterr()
    assert (code, out) == (EXIT_ERROR, "")
    assert "SQLAlchemy knows no database driver named 'postgresql+nosuch'" in one_line(err)
    assert "hunter22" not in err


def test_missing_sqlite_file_is_not_created(tmp_path, capsys):
    path = tmp_path / "typo.db"
    code = main(["list", "--url", f"sqlite:///{path}", "--table", "analysis"])
    assert code == EXIT_ERROR
    assert "no SQLite database file" in one_line(capsys.readouterr().err)
    assert not path.exists()


def test_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("DBCANCEL_URL", raising=False)
    assert main(["list", "--table", "analysis"]) == EXIT_ERROR
    assert "--url is required (or set DBCANCEL_URL)" in capsys.readouterr().err
    assert main(["status", "1", "--url", "not a url:secret", "--table", "t"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--url is not a database URL" in err
    assert "secret" not in err
    assert main([]) == EXIT_ERROR
    assert main(["list", "--all", "--status", "pending", "--url", "sqlite://"]) == EXIT_ERROR
    assert main(["demo", "--jobs", "0"]) == EXIT_ERROR
    capsys.readouterr()


def test_help(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for word in ("demo", "cancel", "status", "list", "reap", "exit status", "DBCANCEL_URL"):
        assert word in out
    for command in ("demo", "cancel", "status", "list", "reap"):
        assert main([command, "--help"]) == EXIT_OK
        assert "exit status" in capsys.readouterr().out


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "dbcancel", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m dbcancel")

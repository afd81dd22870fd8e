"""``python -m dbcancel workers`` and ``top``: the real command line in a subprocess,
against a real worker process running real jobs, on every database."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dbcancel import Status

ROOT = Path(__file__).resolve().parents[2]

# A worker process: runs the jobs named on its command line, each in a thread, without
# checkpoints (so that a cancelled one keeps running: "stopping"), until stdin closes.
WORKER = textwrap.dedent(
    """
    import sys, threading
    from sqlalchemy import create_engine
    from dbcancel import Jobs
    from tests.models import Analysis

    engine = create_engine(sys.argv[1])
    jobs = Jobs(engine, Analysis, interval=0.05)
    done = threading.Event()
    entered = []

    def work(job_id):
        with jobs.run(job_id):
            entered.append(job_id)
            print("entered", job_id, flush=True)
            done.wait(60)

    threads = [threading.Thread(target=work, args=(int(i),)) for i in sys.argv[2:]]
    for t in threads:
        t.start()
    sys.stdin.read()
    done.set()
    for t in threads:
        t.join(60)
    engine.dispose()
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBCANCEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cli(db, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbcancel", *args, "--url", db.url, "--table", "analysis"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )


@pytest.fixture
def worker(db):
    """Start a worker process on the given jobs; wait until it runs them all."""
    started = []

    def start(*job_ids: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, db.url, *map(str, job_ids)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        started.append(proc)
        assert proc.stdout is not None
        seen = {proc.stdout.readline().split()[-1] for _ in job_ids}
        assert seen == {str(i) for i in job_ids}
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.communicate(timeout=60)


def test_workers_lists_the_worker_process_with_its_jobs(db, worker):
    a, b, idle = db.add(), db.add(), db.add()
    proc = worker(a, b)
    result = cli(db, "workers")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["host", "pid", "jobs", "beat", "age", "period", "state"]
    (mine,) = [ln for ln in lines[2:] if re.search(rf"\s{proc.pid}\s", ln)]
    _host, pid, running, beat_age, period, state = mine.split()
    assert (pid, running, period, state) == (str(proc.pid), "2", "10s", "alive")
    assert re.fullmatch(r"\d+(\.\d)?s", beat_age)
    assert db.row(idle).status == Status.PENDING.value  # read-only
    proc.communicate("", timeout=60)
    assert proc.returncode == 0


def test_top_once_shows_running_and_stopping_jobs(db, worker):
    running, stopping, pending = db.add(), db.add(), db.add()
    proc = worker(running, stopping)
    assert db.jobs().cancel(stopping, reason="user left")
    result = cli(db, "top", "--once")
    assert result.returncode == 0, result.stderr
    title, headers, _, *rows = result.stdout.splitlines()
    assert title.startswith("analysis: 1 in progress, 1 cancelled and stopping, at ")
    assert headers.split() == ["id", "status", "age", "beat", "age", "worker", "cancel"]
    by_id = {int(r.split()[0]): r for r in rows}
    assert set(by_id) == {running, stopping}  # not the pending job
    assert by_id[running].split()[1] == "in_progress"
    assert by_id[running].split()[-1] == "-"
    assert f":{proc.pid}:" in by_id[running]
    assert by_id[stopping].split()[1] == "cancelled"
    assert re.search(r"requested \d+(\.\d)?s ago: user left$", by_id[stopping])
    proc.communicate("", timeout=60)
    assert db.row(pending).status == Status.PENDING.value


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_top_refreshes_until_interrupted(db, worker):
    job = db.add()
    proc = worker(job)
    top = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dbcancel",
            "top",
            "--every",
            "0.2",
            "--url",
            db.url,
            "--table",
            "analysis",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert top.stdout is not None
    titles = []
    deadline = time.monotonic() + 60
    while len(titles) < 2 and time.monotonic() < deadline:
        line = top.stdout.readline()
        if line.startswith("analysis: "):
            titles.append(line)
    assert len(titles) == 2
    assert all(t.startswith("analysis: 1 in progress") for t in titles)
    proc.communicate("", timeout=60)  # the job ends: the next frames show nothing
    while time.monotonic() < deadline:
        line = top.stdout.readline()
        if line.startswith("analysis: 0 in progress, 0 cancelled and stopping"):
            break
    else:
        pytest.fail("top never showed the job gone")
    assert top.stdout.readline() == "\n"  # a title alone, then the blank line
    top.send_signal(signal.SIGINT)  # as Ctrl-C
    _, err = top.communicate(timeout=60)
    assert top.returncode == 130
    assert err.strip().endswith("interrupted")


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_workers_before_any_job_ran(tmp_path, db):
    from sqlalchemy import create_engine

    from tests.models import Base

    path = tmp_path / "fresh.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine, tables=[Base.metadata.tables["analysis"]])
    engine.dispose()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dbcancel",
            "workers",
            "--url",
            f"sqlite:///{path}",
            "--table",
            "analysis",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no worker table beside analysis: no job has run yet\n"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_flask_dbcancel_has_the_same_commands(db, worker):
    from flask import Flask

    from dbcancel.contrib.flask import DBCancel
    from tests.models import Analysis

    job = db.add()
    proc = worker(job)
    app = Flask(__name__)
    DBCancel(app, engine=db.engine, model=Analysis)
    runner = app.test_cli_runner()
    top = runner.invoke(args=["dbcancel", "top", "--once"])
    assert top.exit_code == 0, top.output
    assert top.output.startswith("analysis: 1 in progress, 0 cancelled and stopping, at ")
    (row,) = top.output.splitlines()[3:]
    assert row.split()[:2] == [str(job), "in_progress"]
    listed = runner.invoke(args=["dbcancel", "workers"])
    assert listed.exit_code == 0, listed.output
    assert re.search(rf"\s{proc.pid}\s+1\s", listed.output)
    proc.communicate("", timeout=60)

"""``manage.py dbcancel workers`` and ``top`` as a shell runs them (``run_from_argv``:
exit status and streams), beside a worker process running a real job, on every database.
``python -m dbcancel`` runs the same commands in subprocesses in
``tests/integration/test_fleet_cli.py``."""

from __future__ import annotations

import re
import subprocess
import sys

from dbcancel import Status
from dbcancel.contrib.django.management.commands.dbcancel import Command

from . import settings as test_settings
from .conftest import JOIN_TIMEOUT


def child(alias: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.contrib.django.child", *args],
        cwd=test_settings.ROOT,
        env=test_settings.child_env(alias),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def manage(capsys, alias: str, *args: str) -> tuple[int, str, str]:
    argv = ["manage.py", "dbcancel", *args, "--model", "testapp.Analysis", "--database", alias]
    try:
        Command().run_from_argv(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_workers_and_top_see_a_worker_process_and_its_job(alias, jobs, add, capsys):
    job, pending = add(), add()
    worker = child(alias, "worker", str(job))
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "entered\n"

        code, out, err = manage(capsys, alias, "workers")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["host", "pid", "jobs", "beat", "age", "period", "state"]
        (mine,) = [ln for ln in lines[2:] if re.search(rf"\s{worker.pid}\s", ln)]
        assert mine.split()[1:3] == [str(worker.pid), "1"]  # its one job
        assert mine.split()[-2:] == ["10s", "alive"]

        code, out, err = manage(capsys, alias, "top", "--once")
        assert code == 0, err
        title, headers, _, *rows = out.splitlines()
        table = jobs.model._meta.db_table
        assert title.startswith(f"{table}: 1 in progress, 0 cancelled and stopping, at ")
        assert headers.split() == ["id", "status", "age", "beat", "age", "worker", "cancel"]
        (row,) = rows
        assert row.split()[:2] == [str(job), "in_progress"]
        assert row.split()[-1] == "-"

        assert jobs.cancel(job, reason="done looking")
        assert jobs.wait(job, timeout=JOIN_TIMEOUT) is Status.CANCELLED
        worker.communicate(timeout=JOIN_TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert jobs.status(pending) is Status.PENDING

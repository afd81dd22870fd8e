"""A child process for the cross-process tests: ``python -m tests.contrib.django.child``.

``db_worker ARGS...``: runs ``manage.py db_worker ARGS...`` (Django Tasks' database
worker) on the test database. ``worker ID``: runs job ID with ``DjangoJobs`` until it is
cancelled, printing ``entered`` once inside and ``left <status>`` at the end.
``cancel ID REASON``: cancels job ID and prints what ``cancel()`` returned. The database
is the test database the parent passed in the environment (see ``settings.child_env``).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from tests.contrib.django import settings as test_settings


def start_db_worker(alias: str, **overrides: Any) -> subprocess.Popen[str]:
    """``db_worker --batch`` in a child on the test database of ``alias`` (``overrides``
    as for ``settings.child_env``): it runs every queued task, then exits; its output
    (stdout and stderr) is piped."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.contrib.django.child",
            "db_worker",
            "--batch",
            "--no-reload",
            "--no-startup-delay",
            "--interval=0.05",
            "--verbosity=2",
        ],
        cwd=test_settings.ROOT,
        env=test_settings.child_env(alias, **overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def main(argv: list[str]) -> int:
    test_settings.configure_child()
    from django.db import connections

    try:
        return run(argv)
    finally:
        connections.close_all()


def run(argv: list[str]) -> int:
    from dbcancel.contrib.django import DjangoJobs
    from tests.contrib.django.testapp.models import Analysis

    if argv[0] == "db_worker":
        from django.core.management import call_command

        call_command("db_worker", *argv[1:])
        return 0
    jobs = DjangoJobs(Analysis, interval=0.05)
    command, job_id = argv[0], int(argv[1])
    if command == "worker":
        with jobs.run(job_id) as cp:
            print("entered", flush=True)
            while True:
                cp()
                sum(i * i for i in range(300))  # one item of work
        print(f"left {jobs.status(job_id).value}", flush=True)
        return 0
    if command == "cancel":
        print(f"cancel returned {jobs.cancel(job_id, reason=argv[2])}", flush=True)
        return 0
    print(f"unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

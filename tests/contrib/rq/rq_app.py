"""The job functions the ``rq worker`` subprocesses of the tests run.

Configured by environment variables set by the test that starts the workers:
``DBCANCEL_RQ_DB`` (the database URL, with the test run's schema) and ``DBCANCEL_RQ_MARKS``
(a folder where each body run appends ``<pid>`` to ``ran-<job id>``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import rq
from sqlalchemy import create_engine

from dbcancel import Checkpoint
from dbcancel.contrib.rq import RQJobs
from tests.models import Analysis

MARKS = Path(os.environ.get("DBCANCEL_RQ_MARKS", "."))

# Imported in the worker, before it forks a horse per job: the case RQJobs must handle.
engine = create_engine(os.environ.get("DBCANCEL_RQ_DB", "sqlite:///rq-test.db"), pool_pre_ping=True)
cancellable = RQJobs(engine, Analysis, interval=0.05, heartbeat=0.2)


def mark(job_id: int) -> int:
    """Record that the body of ``job_id`` ran in this process; return how many times."""
    path = MARKS / f"ran-{job_id}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


@cancellable.task()
def loop(cp: Checkpoint, job_id: int, steps: int, step_seconds: float) -> int:
    """A worker loop: ``steps`` items of ``step_seconds`` each, one checkpoint per item."""
    mark(job_id)
    for _ in range(steps):
        cp()
        time.sleep(step_seconds)  # the work of one item
    return steps


@cancellable.task()
def flaky(cp: Checkpoint, job_id: int, failures: int) -> int:
    """Fails with a transient OSError on its first ``failures`` runs, then succeeds."""
    runs = mark(job_id)
    cp()
    if runs <= failures:
        raise OSError("transient")
    return runs


class Worker(rq.Worker):
    """``rq worker -w tests.contrib.rq.rq_app.Worker``: imports this module, its engine
    included, in the worker before it forks the horses (as an app that preloads does),
    so that a horse starts at once and inherits the engine."""
